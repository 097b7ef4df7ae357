"""Artifact integrity: every output agrees with its sidecar, and no stale temporary files.

- :func:`check` (``engineforge check``) re-hashes every output every sidecar records.
- :func:`sweep` runs at every workflow parse (dry runs too). An output whose size differs
  from its sidecar's record, or whose mtime left the window the record allows, is
  re-hashed. One whose content no longer matches (or a sidecar that cannot be read) moves
  into ``<artifacts>/_quarantine/<time>/`` with its sidecar, every result built from it
  (sidecars whose recorded inputs it is, transitively) and the model's tracking record (a
  target: Snakemake reruns a job with missing outputs only when a target needs it), so
  the next run rebuilds exactly that branch. Staging directories and temporary files
  whose writer died are removed. An unchanged tree costs one directory walk, the
  sidecars' JSON and a stat per file: no hashing.

The mtime window: the runner records each output's mtime when it makes the sidecar (a
rename keeps it); when the job ends Snakemake touches its outputs in declaration order,
the sidecar last. So an output nobody wrote since has an mtime between its recorded one
and its sidecar's. Anything else (a copied tree, an older sidecar without ``mtime_ns``)
is hashed once and remembered in ``_integrity/verified.json`` by (size, mtime, sha256).

Outputs sit beside their sidecar (every rule's do; the MLflow cache relies on it too), so
a tree moved or copied elsewhere is checked where it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engineforge import sidecar as sc
from engineforge.errors import EngineforgeError
from engineforge.layout import Layout
from engineforge.runlock import pid_alive

QUARANTINE = "_quarantine"
VERIFIED = "_integrity/verified.json"  # outputs re-hashed since their stat left the record
UNKNOWN_WRITER_AGE_S = 3600  # a temp file naming no pid: removed when untouched this long
# .<name>.<pid>@<host>.<random>.tmp (sidecar.atomic_path)
TEMP_FILE = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[^@/]+)\.[^.]+\.tmp$")
# .staging-<host>-<pid>-<random> (runner._Staging, sidecar.scratch_prefix)
STAGING_DIR = re.compile(r"^\.staging-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
LEGACY_SCRATCH = re.compile(r"^\.quantize-[^/]+$")  # the int8 scratch before it named its pid


class IntegrityError(EngineforgeError):
    stage = "integrity"


@dataclass
class Report:
    sidecars: int = 0
    outputs: int = 0
    hashed: int = 0  # outputs re-hashed
    problems: list[str] = field(default_factory=list)  # one line each
    quarantined: list[Path] = field(default_factory=list)  # sidecars moved aside
    removed: list[Path] = field(default_factory=list)  # stale temporary files/dirs


# -- finding sidecars and temporary files -------------------------------------------------------
def _sidecar_pattern() -> re.Pattern:
    """Every sidecar path of the Layout, relative to its root, as one regex."""
    lay = Layout("")
    templates = [lay.export("export.json"), lay.profile_check(), lay.simplify("simplify.json"),
                 lay.precision("precision.json"), lay.quantized("precision.json", "{q}"),
                 lay.build(), lay.audit(), lay.bench(),
                 lay.baseline()]
    parts = [r"[^/.][^/]*".join(re.escape(p) for p in re.split(r"\{\w+\}", t))
             for t in templates]
    return re.compile("|".join(f"(?:{p})" for p in parts))


SIDECAR = _sidecar_pattern()


def _scan(root: Path) -> tuple[list[Path], list[Path]]:
    """(sidecars, hidden temporary entries) under ``root``; the quarantine is skipped."""
    sidecars, hidden = [], []

    def walk(d: str, rel: str) -> None:
        with os.scandir(d) as entries:
            for e in entries:
                r = f"{rel}/{e.name}"
                if e.name.startswith("."):
                    hidden.append(Path(e.path))
                elif e.is_dir(follow_symlinks=False):
                    if r != f"/{QUARANTINE}":
                        walk(e.path, r)
                elif e.name.endswith(".json") and SIDECAR.fullmatch(r):
                    sidecars.append(Path(e.path))

    walk(str(root), "")
    return sorted(sidecars), hidden


def _writer(entry: Path) -> tuple[str, int] | None | bool:
    """(host, pid) of a temporary entry's writer; None: a temp entry naming no writer;
    False: not a temporary entry."""
    m = (STAGING_DIR if entry.is_dir() else TEMP_FILE).match(entry.name)
    if m:
        return m["host"], int(m["pid"])
    legacy = LEGACY_SCRATCH.match(entry.name) if entry.is_dir() else entry.name.endswith(".tmp")
    return None if legacy else False


def stale(entry: Path, now: float | None = None) -> bool:
    """Whether a temporary file or staging directory was left by a writer that is gone."""
    now = time.time() if now is None else now
    writer = _writer(entry)
    if writer is False:
        return False
    if writer is None:  # written before temp names carried a pid: go by age
        with contextlib.suppress(OSError):  # gone meanwhile: nothing to remove
            return now - entry.lstat().st_mtime > UNKNOWN_WRITER_AGE_S
        return False
    host, pid = writer
    return host == socket.gethostname() and not pid_alive(pid)  # another host's: cannot tell


# -- reading sidecars ---------------------------------------------------------------------------
def _read(path: Path) -> tuple[dict | None, str]:
    """(sidecar, "") or (None, why it cannot be trusted)."""
    try:
        side = json.loads(path.read_bytes())
    except OSError as err:
        return None, f"unreadable: {err.strerror}"
    except ValueError as err:
        return None, f"not valid JSON, half-written or edited: {err}"
    outputs = side.get("outputs") if isinstance(side, dict) else None
    if (not isinstance(outputs, dict) or "sidecar_version" not in side
            or not all(isinstance(r, dict) and isinstance(r.get("path"), str)
                       and isinstance(r.get("sha256"), str) and isinstance(r.get("bytes"), int)
                       for r in outputs.values())):
        return None, "not a complete sidecar (no sidecar_version or output records)"
    return side, ""


def _outputs(path: Path, side: dict) -> dict[str, tuple[Path, dict]]:
    return {role: (path.parent / Path(rec["path"]).name, rec)
            for role, rec in side["outputs"].items()}


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- engineforge check --------------------------------------------------------------------------
def check(root: str | os.PathLike) -> Report:
    """Re-hash every output every sidecar under ``root`` records (nothing is changed)."""
    root = _root(root)
    report = Report()
    sidecars, _ = _scan(root)
    report.sidecars = len(sidecars)
    todo = []
    for path in sidecars:
        side, why = _read(path)
        if side is None:
            report.problems.append(f"{_rel(path)}: sidecar {why}")
            continue
        for file, rec in _outputs(path, side).values():
            report.outputs += 1
            if not file.is_file():
                report.problems.append(f"{_rel(file)}: missing (recorded in {path.name})")
            else:
                todo.append((path, file, rec))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda t: _hash(t[1]), todo))  # hashlib frees the GIL
    report.hashed = len(todo)
    for (path, file, rec), sha in zip(todo, hashes):
        if isinstance(sha, OSError):
            report.problems.append(f"{_rel(file)}: unreadable ({sha.strerror})")
        elif sha != rec["sha256"]:
            report.problems.append(
                f"{_rel(file)}: content differs from {path.name} (sha256 {sha[:12]} on disk, "
                f"{rec['sha256'][:12]} recorded)")
    report.problems.sort()
    return report


def _hash(file: Path) -> str | OSError:
    try:
        return sc.sha256_file(file)
    except OSError as err:
        return err


# -- the parse-time sweep -----------------------------------------------------------------------
def sweep(root: str | os.PathLike, *, out=None) -> Report:
    """Quarantine outputs that no longer match their sidecar, remove stale temporary files.
    One line per case on ``out`` (stderr). Raises IntegrityError when an untrusted file
    cannot be moved aside."""
    out = out or sys.stderr
    root = Path(root)
    report = Report()
    if not root.is_dir():
        return report
    sidecars, hidden = _scan(root)
    now = time.time()
    for entry in hidden:
        if stale(entry, now) and _remove(entry):
            report.removed.append(entry)
    if report.removed:
        print(f"engineforge: removed {len(report.removed)} temporary file(s) or staging "
              f"dir(s) a killed run left under {root}", file=out)

    verified_path = root / VERIFIED
    verified = _load_verified(verified_path)
    seen: dict[str, list] = {}
    parsed: dict[Path, dict | None] = {}
    bad: dict[Path, list[str]] = {}  # sidecar -> one line per problem
    report.sidecars = len(sidecars)
    for path in sidecars:
        side, why = _read(path)
        parsed[path] = side
        if side is None:
            bad[path] = [f"engineforge: {_rel(path)} is not a trustworthy sidecar ({why}); "
                         "its job will be rebuilt"]
            continue
        side_mtime = path.stat().st_mtime_ns
        for file, rec in _outputs(path, side).values():
            report.outputs += 1
            reason = _mismatch(root, file, rec, side_mtime, verified, seen, report)
            if reason:
                bad.setdefault(path, []).append(
                    f"engineforge: {_rel(file)} does not match its sidecar {path.name} "
                    f"({reason}); it will be rebuilt")
    if bad:
        stamp = _quarantine_dir(root)
        untrusted = _with_dependents(root, parsed, set(bad))
        order = sorted(bad) + sorted(untrusted - set(bad))  # the causes first
        files = [f for side in order for f in _files(side, parsed[side])]
        # Snakemake reruns a job with a missing output only when a target needs it: the
        # model's tracking record (a target, built from every sidecar) goes too
        models = sorted({side.relative_to(root).parts[0] for side in untrusted})
        files += [Path(Layout(str(root)).track(m)) for m in models]
        _quarantine(root, stamp, files)
        for f in files:
            seen.pop(f.relative_to(root).as_posix(), None)
        report.quarantined = sorted(untrusted)
        for path in sorted(bad):
            report.problems += bad[path]
            for line in bad[path]:
                print(f"{line} (moved to {_rel(stamp)})", file=out)
        if len(untrusted) > len(bad):
            print(f"engineforge: {len(untrusted) - len(bad)} result(s) built from them are "
                  "rebuilt too (moved there as well)", file=out)
    if seen != verified:
        with contextlib.suppress(OSError):  # a cache only (a read-only tree is still checked)
            sc.write_json(verified_path, seen)
    return report


def _files(path: Path, side: dict | None) -> list[Path]:
    """A sidecar first (it vouches for the rest), then its outputs."""
    return [path, *(f for f, _ in (_outputs(path, side).values() if side else []))]


def _with_dependents(root: Path, parsed: dict[Path, dict | None],
                     bad: set[Path]) -> set[Path]:
    """``bad`` and every sidecar whose recorded inputs come from them, transitively (an
    unreadable sidecar's whole directory is suspect: its outputs are unknown)."""
    untrusted = set(bad)
    files: set[str] = set()
    dirs: set[str] = set()
    todo = list(bad)
    while todo:
        for path in todo:
            if parsed[path] is None:
                dirs.add(path.parent.relative_to(root).as_posix())
            files.update(f.relative_to(root).as_posix() for f in _files(path, parsed[path]))
        todo = []
        for path, side in parsed.items():
            if path in untrusted or side is None:
                continue
            for rec in (side.get("inputs") or {}).values():
                parts = Path(str(rec.get("path", "") if isinstance(rec, dict) else "")).parts
                tails = ["/".join(parts[i:]) for i in range(len(parts))]
                if any(t in files or t.rpartition("/")[0] in dirs for t in tails):
                    untrusted.add(path)
                    todo.append(path)
                    break
    return untrusted


def _mismatch(root: Path, file: Path, rec: dict, side_mtime: int, verified: dict,
              seen: dict, report: Report) -> str:
    """Why ``file`` does not match its record ("" when it does); hashes only when its mtime
    left the window (see the module's docstring)."""
    try:
        st = file.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size != rec["bytes"]:
        return f"{st.st_size} bytes, {rec['bytes']} recorded"
    stat = [st.st_size, st.st_mtime_ns, rec["sha256"]]
    recorded = rec.get("mtime_ns")
    if isinstance(recorded, int) and (st.st_mtime_ns == recorded
                                      or recorded <= st.st_mtime_ns <= side_mtime):
        return ""
    key = file.relative_to(root).as_posix()
    if verified.get(key) == stat:
        seen[key] = stat
        return ""
    report.hashed += 1
    sha = sc.sha256_file(file)
    if sha != rec["sha256"]:
        return f"content changed: sha256 {sha[:12]}, {rec['sha256'][:12]} recorded"
    seen[key] = stat  # same bytes, new mtime (copied, touched, or an older sidecar)
    return ""


def _load_verified(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _quarantine_dir(root: Path) -> Path:
    return root / QUARANTINE / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _quarantine(root: Path, stamp: Path, files: list[Path]) -> None:
    for f in files:
        if not f.exists():
            continue
        dest = stamp / f.relative_to(root)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        except OSError as err:
            raise IntegrityError(
                f"cannot move {_rel(f)} aside ({err.strerror}); it is untrusted: it, or what "
                "it was built from, no longer matches its sidecar.", key="artifacts",
                fix=f"make {_rel(root)} writable or delete {_rel(f.parent)}, then "
                    "rerun") from None


def _remove(entry: Path) -> bool:
    """Remove a stale temporary entry; False where it cannot be (it is never trusted)."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def _root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise IntegrityError(f"artifacts directory '{root}' {what}.", key="artifacts",
                             fix="pass --artifacts <dir> of a built tree")
    return root


def at_parse(root: str | os.PathLike) -> None:
    """The workflow's call: :func:`sweep`, and one line + exit 1 when it cannot finish."""
    try:
        sweep(root)
    except (OSError, EngineforgeError) as err:
        if isinstance(err, OSError):  # e.g. an unreadable directory in the tree
            err = IntegrityError(f"cannot check the artifacts under {root}: {err}.",
                                 key="artifacts", fix="make the artifacts directory readable")
        sys.stderr.write(f"engineforge: {err}\n")
        sys.exit(1)
