"""The stage runner: one skeleton around every stage body.

For each Snakemake job the runner builds a :class:`~engineforge.job.Job`, computes the
fingerprint (input content hashes + settings + tool versions + device), asks the MLflow
cache, runs the stage body (in a crash-isolated child process for stages that touch native
code), publishes the outputs atomically, writes the sidecar, and records a failure as one
line (model, stage, key, fix) for the end-of-run list. Stage bodies never import tracking
or the cache.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import threading
import time
import traceback
import uuid
from dataclasses import replace
from pathlib import Path

from engineforge import cache, failures, integrity, worker
from engineforge.errors import ConfigError, EngineforgeError
from engineforge.job import Canonical, Job
from engineforge.redaction import redact
from engineforge.sidecar import (
    fingerprint,
    make_sidecar,
    scratch_prefix,
    sha256_file,
    where_ran,
    write_json,
)

DEFAULT_TIMEOUT_S = 3600.0


class StageFailed(Exception):
    """Raised to Snakemake: its text is the one line the user reads."""


def stage_module(stage: str):
    from engineforge.stages import STAGES

    return importlib.import_module(STAGES[stage])


def timeout_s(job: Job | None = None) -> float:
    """The job's time limit: ENGINEFORGE_JOB_TIMEOUT_S when set (every stage), else the
    model's ``time_limits.<stage>``."""
    raw = os.environ.get("ENGINEFORGE_JOB_TIMEOUT_S")
    if raw is None:
        limits = job.limits if job is not None else {}
        return float(limits.get(job.stage if job else "", DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"ENGINEFORGE_JOB_TIMEOUT_S={raw!r} is not a positive number of "
                          "seconds.", key="ENGINEFORGE_JOB_TIMEOUT_S",
                          fix="set it to e.g. 3600, or unset it")
    return value


# -- called from the rules ---------------------------------------------------------------------
def run_rule(stage: str, wildcards, input, output, params, log, artifacts: str,
             limits: dict | None = None, inputs_root: str | None = None) -> None:
    """Snakemake's ``run:`` body of every rule: turn the rule's objects into a Job, run it."""
    w = dict(wildcards.items())
    if "backend" in params.keys():  # rules that hold their backend in the path
        w["backend"] = params.backend
    named_in = {k: Path(v) for k, v in input.items() if isinstance(v, str)}
    named_out = {k: Path(v) for k, v in output.items()}
    extra = [Path(f) for f in input if Path(f) not in named_in.values()]
    settings = params.settings.value if "settings" in params.keys() else None
    tools = params.tools.value if "tools" in params.keys() else {}
    job = Job(stage=stage, model=w.get("model"), wildcards=w, inputs=named_in,
              outputs=named_out, settings=settings, tools=tools, device=None,
              log=Path(log[0]), artifacts=artifacts, extra_inputs=extra,
              limits=dict(limits or {}), inputs_root=inputs_root)
    run_job(job)


def run_job(job: Job) -> None:
    job_id = failures.job_id(job)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.log.write_text("")
    failures.record_unfinished(job)  # what a job killed from outside leaves behind
    try:
        _run(job, job_id)
        failures.clear(job)
    except EngineforgeError as err:
        if err.stage in ("engineforge", "job"):
            err.stage = job.stage
        err.model = err.model or job.model
        _append_log(job.log, f"ERROR {err}")
        line = redact(" ".join(str(err).split()))  # one line; the log keeps the full text
        _record(job, line)
        raise StageFailed(line) from None
    except Exception as err:  # noqa: BLE001 - a bug or an unforeseen tool failure
        if not isinstance(err, worker.UnexpectedError):
            _append_log(job.log, f"unexpected error:\n{traceback.format_exc()}")
        text = " ".join(str(err).split())[:300] or "(no message)"
        name = "" if isinstance(err, worker.UnexpectedError) else f"{type(err).__name__}: "
        hint = getattr(stage_module(job.stage), "LIKELY_FIX", None) or DEFAULT_FIX
        line = redact(str(_Unforeseen(f"{name}{text}", stage=job.stage, model=job.model,
                                      fix=f"{hint}; the full traceback is in {job.log}")))
        _record(job, line)
        raise StageFailed(line) from None


DEFAULT_FIX = "read the traceback in the log; if the input is valid, report a bug"


class _Unforeseen(EngineforgeError):
    """A library error no check foresaw, in our one-line format."""

    def __init__(self, message, *, stage, **kw):
        self.stage = stage
        super().__init__(message, **kw)


def _run(job: Job, job_id: str) -> None:
    stage = stage_module(job.stage)
    if hasattr(stage, "device"):  # what the output is specific to (engines: the GPU class)
        job = replace(job, device=stage.device(job))
    sidecar_path = job.outputs.get("sidecar")
    settings = Canonical(job.settings).dump()
    if sidecar_path is not None:
        hashes = {role: sha256_file(p) for role, p in job.inputs.items()}
        fp = fingerprint(hashes, settings, job.tools, job.device)
        group = stage.cache_group(job) if hasattr(stage, "cache_group") else None
        if group:
            with _log_to(job.log):  # "cache hit ..." belongs in the job's log
                hit = cache.restore(group, fp, {k: v for k, v in job.outputs.items()
                                                if k != "sidecar"}, sidecar_path)
            if hit:
                return
    before = _stat(job.inputs)
    staging = _Staging(job)
    try:
        t0, started_at = time.perf_counter(), time.time()
        if getattr(stage, "ISOLATED", True) and worker.enabled():
            lane = stage.worker_lane(job) if hasattr(stage, "worker_lane") else None
            result = worker.run_isolated("engineforge.runner:body", staging.job,
                                         log_path=job.log, timeout_s=timeout_s(job), job=job_id,
                                         lane=lane)
        else:
            with _log_to(job.log):
                result = body(staging.job)
        _check_inputs_untouched(job, before)
        if sidecar_path is not None:
            side = make_sidecar(
                stage=job.stage, model=job.model or "", inputs=job.inputs, input_hashes=hashes,
                config_slice=settings, tools=job.tools,
                outputs={k: v for k, v in staging.job.outputs.items() if k != "sidecar"},
                result=result.model_dump(mode="json") if result is not None else {},
                device=job.device)
            side["wall_s"] = round(time.perf_counter() - t0, 3)
            # where and when the work ran (MLflow runs show it, instead of when they were
            # logged; releases carry it as provenance)
            side["ran"] = where_ran(started_at, time.time())
            side["started_at"], side["finished_at"] = (side["ran"]["started_at"],
                                                       side["ran"]["finished_at"])
            side["outputs"] = {k: {**v, "path": str(job.outputs[k])}
                               for k, v in side["outputs"].items()}
            write_json(staging.job.outputs["sidecar"], side)
        staging.publish()
    finally:
        staging.cleanup()


def _stat(files: dict[str, Path]) -> dict[str, tuple]:
    out = {}
    for role, p in files.items():
        try:
            st = os.stat(p)
            out[role] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[role] = None
    return out


def _check_inputs_untouched(job: Job, before: dict) -> None:
    """A stage must never write to its inputs (they are other jobs' published outputs, which
    their sidecars vouch for). Libraries that write beside their input get a copy."""
    changed = [role for role, st in _stat(job.inputs).items() if st != before[role]]
    if changed:
        raise EngineforgeError(
            f"the {job.stage} stage modified its input(s) "
            f"{', '.join(f'{r} ({job.inputs[r]})' for r in changed)}; its result is not "
            "trusted and the changed file will be rebuilt", fix="report this bug (a library "
            "wrote to its input: the stage must hand it a copy)")


def body(job: Job):
    """The stage body, wherever it runs (child process or this thread)."""
    return stage_module(job.stage).run(job)


class _Staging:
    """Outputs are written under a hidden directory beside each and renamed into place
    afterwards, so an interrupted job never leaves a file a later run would trust. Every
    file the body leaves there (e.g. ONNX external data) is published with its output."""

    def __init__(self, job: Job):
        self.key = f"{scratch_prefix()}{uuid.uuid4().hex[:8]}"
        self.dirs: dict[Path, Path] = {}
        staged = {}
        for role, path in job.outputs.items():
            if path.parent not in self.dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._clean_stale(path.parent)
            d = self.dirs.setdefault(path.parent, path.parent / self.key)
            d.mkdir(parents=True, exist_ok=True)
            staged[role] = d / path.name
        self.final = job.outputs
        self.job = job.with_outputs(staged)

    @staticmethod
    def _clean_stale(parent: Path) -> None:
        """Staging directories a killed run left here (their process is gone) are removed
        (the run's start-up sweep does the same across the tree; a cluster job may start
        long after it)."""
        for d in parent.glob(".staging-*"):
            if integrity.stale(d):
                shutil.rmtree(d, ignore_errors=True)

    def publish(self) -> None:
        declared = {self.job.outputs[r]: self.final[r] for r in self.final}
        sidecars = [s for s in declared if s.name.endswith(".json")]
        for staged_dir in self.dirs.values():
            for f in sorted(staged_dir.iterdir()):
                if f not in declared:  # companions first (external data), never trusted alone
                    os.replace(f, staged_dir.parent / f.name)
        for src, dest in declared.items():
            if src not in sidecars:
                if not src.exists():
                    raise EngineforgeError(f"the {self.job.stage} stage wrote no {dest.name}",
                                           fix="report this bug")
                os.replace(src, dest)
        for src in sidecars:  # the sidecar last: it vouches for the rest
            if src.exists():
                os.replace(src, declared[src])

    def cleanup(self) -> None:
        for d in self.dirs.values():
            shutil.rmtree(d, ignore_errors=True)


# -- logs and failures --------------------------------------------------------------------------
class _ThreadFilter(logging.Filter):
    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record):
        return record.thread == self.thread


class _log_to:
    """Records of this thread go to ``path`` (in-process bodies: jobs share the process)."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, mode="a")
        self.handler.addFilter(_ThreadFilter())
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def __enter__(self):
        root = logging.getLogger()
        root.addHandler(self.handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


def _append_log(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(redact(text).rstrip() + "\n")


def _record(job: Job, line: str) -> None:
    """The failure record of ``job`` for the end-of-run report (``failures.py``)."""
    failures.record(job, line)


class OneLineFailures(logging.Filter):
    """Snakemake prints a failed ``run:`` block as ``RuleException: StageFailed in file
    <rule file>, line N:`` + our line + the Python frames of the rule files. Our line already
    names the model, stage, key, fix and log (the traceback, if any, is in the job's log):
    this filter on Snakemake's logger keeps just that line. Its "Directory cannot be locked"
    becomes one line naming the run that holds the directory, when that run is ours."""

    MARK = f"{StageFailed.__name__} in "

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if "Directory cannot be locked" in msg:
            from engineforge import runlock

            if busy := runlock.busy_line():
                record.msg, record.args = f"engineforge: {busy}", ()
        elif self.MARK in msg:
            after = msg.split(self.MARK, 1)[1].split("\n", 1)
            if len(after) == 2:
                record.msg = after[1].split("\n  File ", 1)[0].strip()
                record.args = ()
        return True


def quiet_stage_failures() -> None:
    log = logging.getLogger("snakemake.logging")  # the logger snakemake.logging.logger
    if not any(isinstance(f, OneLineFailures) for f in log.filters):
        log.addFilter(OneLineFailures())


def fail_fast(err: EngineforgeError | str) -> None:
    """Bad config: one line, no traceback, before any job runs."""
    sys.stderr.write(f"engineforge: {err}\n")
    sys.exit(1)


def print_file(path) -> None:
    path = Path(path)
    if path.exists():
        print(path.read_text())
