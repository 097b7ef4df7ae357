"""Glue between Snakemake rules and stage modules.

Rules call :func:`run_stage`, which sends the stage's log records to the
rule's ``log:`` file, turns a known error into one line (model, stage, key,
fix) and records it for the end-of-run failure list. Unexpected exceptions
keep their traceback in the log file, never on the terminal.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from pathlib import Path

from engineforge.errors import EngineforgeError

FAILURES = "_failures"


class StageFailed(Exception):
    """Raised to Snakemake: its text is the one line the user reads."""


class _ThreadFilter(logging.Filter):
    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record):
        return record.thread == self.thread


def run_stage(log_path, failure_id: str, artifacts: str, fn, *args, **kwargs):
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.addFilter(_ThreadFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    failure = Path(artifacts) / FAILURES / f"{failure_id}.txt"
    try:
        out = fn(*args, **kwargs)
        failure.unlink(missing_ok=True)
        return out
    except EngineforgeError as err:
        logging.getLogger("engineforge").error("%s", err)
        _record(failure, str(err))
        raise StageFailed(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a bug or an unforeseen tool failure
        logging.getLogger("engineforge").error("unexpected error:\n%s", traceback.format_exc())
        line = (f"[{failure_id}] unexpected {type(err).__name__}: "
                f"{(str(err).strip().splitlines() or [''])[0][:300]} (traceback: {log_path})")
        _record(failure, line)
        raise StageFailed(line) from None
    finally:
        root.removeHandler(handler)
        handler.close()


def _record(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def fail_fast(err: EngineforgeError) -> None:
    """Bad config: one line, no traceback, before any job runs."""
    sys.stderr.write(f"engineforge: {err}\n")
    sys.exit(1)


def backend_availability(names) -> dict:
    from engineforge.backends import get_backend

    out = {}
    for name in sorted(names):
        avail = get_backend(name).availability()
        out[name] = {"ok": avail.ok, "reason": avail.reason, "how": avail.how,
                     "version": avail.version, "line": avail.line(name)}
    return out


def print_file(path) -> None:
    path = Path(path)
    if path.exists():
        print(path.read_text())


def print_failures(artifacts, models) -> None:
    files = sorted((Path(artifacts) / FAILURES).glob("*.txt"))
    if not files:
        return
    print(f"\nengineforge: {len(files)} job(s) failed; the other models went on:",
          file=sys.stderr)
    for f in files:
        print(f"  - {f.read_text().strip()}", file=sys.stderr)
