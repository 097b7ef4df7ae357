"""Which run owns this working directory: stale locks after a kill, and concurrent runs.

Snakemake locks the files a run will write (``.snakemake/locks``) and, when the run is
killed (SIGKILL, power loss), leaves the locks behind: the next run refuses to start until
someone runs ``--unlock``. A run of this workflow records its process in
``.snakemake/engineforge-run.json`` once it holds the locks (onstart); the next run then
knows whether that owner is still alive:

- alive: a second run on the same tree would overwrite the first one's outputs; Snakemake
  refuses to lock, and its message becomes one line naming the running process (dry runs
  go on: they write nothing);
- gone: its locks are stale; they are removed (one line says so) and the run goes on;
- on another host (a shared file system): alive or not cannot be told from here, so it
  counts as alive, and the line says how to free the directory if that host went down.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

STATE = Path(".snakemake") / "engineforge-run.json"
LOCKS = Path(".snakemake") / "locks"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (the owner of a lock or a temp file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner() -> dict | None:
    try:
        data = json.loads(STATE.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _mine(rec: dict) -> bool:
    return rec["pid"] == os.getpid() and rec.get("host") == socket.gethostname()


def _elsewhere(rec: dict) -> bool:
    """Recorded by a run on another host (a shared file system): whether it is alive
    cannot be told from here, so it counts as running."""
    return rec.get("host") not in (None, socket.gethostname())


def _running(rec: dict | None) -> bool:
    return bool(rec) and not _mine(rec) and (_elsewhere(rec) or pid_alive(rec["pid"]))


def remove_stale_locks() -> None:
    """Called while the workflow parses: the locks of a recorded run that is gone are
    stale (it was killed); remove them so this run can start."""
    rec = owner()
    if rec is None or _running(rec) or _mine(rec):
        return
    if LOCKS.is_dir() and any(LOCKS.iterdir()):
        for f in LOCKS.iterdir():
            f.unlink(missing_ok=True)
        print(f"engineforge: removed the locks of an earlier run that is gone (pid "
              f"{rec['pid']}); outputs it left half-written are not trusted and will be "
              "rebuilt", file=sys.stderr)
    STATE.unlink(missing_ok=True)


def busy_line() -> str | None:
    """Why this directory is busy (another live run holds it), or None."""
    rec = owner()
    if not _running(rec):
        return None
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("started", 0)))
    if _elsewhere(rec):
        return (f"another run is working in this directory (pid {rec['pid']} on host "
                f"{rec['host']}, started {started}): two runs on one artifacts tree would "
                "overwrite each other's outputs. Fix: wait for it to finish; if that run is "
                f"gone (its host went down), delete {STATE} and rerun with --unlock")
    return (f"another run is working in this directory (pid {rec['pid']}, started "
            f"{started}): two runs on one artifacts tree would overwrite each other's "
            f"outputs. Fix: wait for it to finish, or stop it (kill {rec['pid']}) and rerun; "
            "finished jobs are kept")


def claim() -> None:
    """The run holds Snakemake's locks and starts its jobs (onstart): record it."""
    STATE.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATE.with_name(f".{STATE.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.time(), "argv": sys.argv}))
    os.replace(tmp, STATE)
    atexit.register(release)


def release() -> None:
    """The run ended (success or failure): the directory is free."""
    rec = owner()
    if rec and _mine(rec):
        STATE.unlink(missing_ok=True)
