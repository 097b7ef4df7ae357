"""One root exception; each stage raises its own subclass.

A user error carries what the user needs to fix it: the model, the stage, the
config key and the fix. ``str(err)`` is the one line printed without traceback.
"""

from __future__ import annotations

import re


class EngineforgeError(Exception):
    """Root of every error engineforge raises on purpose."""

    stage = "engineforge"

    def __init__(self, message: str, *, model: str | None = None, key: str | None = None,
                 fix: str | None = None):
        self.message = message
        self.model = model
        self.key = key
        self.fix = fix
        super().__init__(self.__str__())

    def __reduce__(self):  # crosses the worker-process boundary with model/key/fix intact
        return (_rebuild, (type(self), self.message, self.model, self.key, self.fix))

    def __str__(self) -> str:
        where = [f"stage={self.stage}"]
        if self.model:
            where.insert(0, f"model={self.model}")
        if self.key:
            where.append(f"key={self.key}")
        text = f"[{' '.join(where)}] {self.message}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


def _rebuild(cls, message, model, key, fix):
    return cls(message, model=model, key=key, fix=fix)


def first_line(err: BaseException, limit: int = 300, typed: bool = True) -> str:
    """An exception's first non-empty line, cut to ``limit`` characters, after its type
    name (``typed``): a recorded cause (the log keeps the whole text)."""
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")[:limit]
    return f"{type(err).__name__}: {line}" if typed else line


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")
_BOILERPLATE = re.compile(r"^(frame #\d+|Exception raised from|Traceback |File \"|<omitting|"
                          r"Set TORCHDYNAMO_VERBOSE|For even more developer context|from user "
                          r"code:|You can suppress this exception)")


def key_line(text: str, limit: int = 300) -> str:
    """The line of an error text (a message, a child's stderr) that names the error: the
    last ``SomeError: ...`` line (a C++ exception's frames, torch's "Set TORCHDYNAMO_VERBOSE"
    footer and traceback lines come after or around it), else the last other line."""
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not _BOILERPLATE.match(ln.strip())]
    named = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return ((named or lines or ["no message"])[-1])[:limit]


class ConfigError(EngineforgeError):
    stage = "config"


class ExportError(EngineforgeError):
    stage = "export"


class ProfileError(EngineforgeError):
    stage = "profiles"


class SimplifyError(EngineforgeError):
    stage = "simplify"


class PrecisionError(EngineforgeError):
    stage = "precision"


class AuditError(EngineforgeError):
    stage = "audit"


class GateError(EngineforgeError):
    stage = "gate"


class BuildError(EngineforgeError):
    stage = "build"


class BenchError(EngineforgeError):
    stage = "bench"


class TrackingError(EngineforgeError):
    stage = "track"


class ReleaseError(EngineforgeError):
    stage = "release"


class BackendUnavailable(EngineforgeError):
    """A backend cannot run here. Not a failure: the result says 'skipped: <reason>'."""

    stage = "build"


class JobCrashed(EngineforgeError):
    """A job's worker process died (signal, abort, out of memory)."""

    stage = "job"


class JobTimedOut(EngineforgeError):
    """A job ran past its time limit and was killed."""

    stage = "job"


class JobCancelled(EngineforgeError):
    """The run was interrupted (Ctrl-C, SIGTERM) while the job ran; its child was killed."""

    stage = "job"
