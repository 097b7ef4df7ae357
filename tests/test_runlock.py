"""Which run owns a working directory (engineforge/runlock.py): a live owner makes the
directory busy (one line naming it), a gone owner's Snakemake locks are stale and removed.

Owners are real processes: a child that is still running, or one that has exited and been
reaped (its pid is then free)."""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engineforge import runlock

HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """Every test in its own working directory (runlock's paths are relative)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # exited and reaped: no process has this pid now
    return proc.pid


@pytest.fixture
def utc():
    """Local time is UTC while the test runs (busy_line prints the start in local time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TZ", "UTC")
        time.tzset()
        yield
    time.tzset()


def record(pid: int, host: str = HOST, started: float = 0.0) -> None:
    runlock.STATE.parent.mkdir(parents=True, exist_ok=True)
    runlock.STATE.write_text(json.dumps({"pid": pid, "host": host, "started": started,
                                         "argv": ["snakemake"]}))


def locks(*names: str) -> None:
    runlock.LOCKS.mkdir(parents=True, exist_ok=True)
    for name in names:
        (runlock.LOCKS / name).write_text("artifacts/m/export/model.onnx\n")


# -- pid_alive ------------------------------------------------------------------------------
def test_pid_alive_tells_a_running_process_from_a_gone_one(live_pid, dead_pid):
    # execute / assert
    assert runlock.pid_alive(os.getpid()) is True
    assert runlock.pid_alive(live_pid) is True
    assert runlock.pid_alive(dead_pid) is False


def test_pid_alive_counts_another_users_process_as_alive(monkeypatch):
    """os.kill raising PermissionError means the process exists (the boundary is mocked: a
    test cannot rely on another user's process)."""
    # setup
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(runlock.os, "kill", kill)
    # execute / assert
    assert runlock.pid_alive(12345) is True


# -- owner ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [None, "{not json", "[1, 2]", '{"pid": "12"}',
                                  '{"host": "h"}'])
def test_owner_is_none_without_a_valid_record(text):
    # setup
    if text is not None:
        runlock.STATE.parent.mkdir()
        runlock.STATE.write_text(text)
    # execute / assert
    assert runlock.owner() is None


def test_owner_reads_the_record():
    # setup
    record(4242, "node7", 12.5)
    # execute / assert
    assert runlock.owner() == {"pid": 4242, "host": "node7", "started": 12.5,
                               "argv": ["snakemake"]}


# -- claim / release ------------------------------------------------------------------------
def test_claim_records_this_process_and_registers_its_release(monkeypatch, workdir):
    """atexit.register is the boundary replaced here: the real one would run release() when
    the test process ends."""
    # setup
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(sys, "argv", ["snakemake", "--cores", "2"])
    before = time.time()
    # execute
    runlock.claim()
    # assert
    rec = json.loads((workdir / ".snakemake" / "engineforge-run.json").read_text())
    assert (rec["pid"], rec["host"], rec["argv"]) == (os.getpid(), HOST,
                                                      ["snakemake", "--cores", "2"])
    assert before <= rec["started"] <= time.time()
    assert registered == [runlock.release]
    assert sorted(p.name for p in (workdir / ".snakemake").iterdir()) == ["engineforge-run.json"]


def test_release_frees_the_directory_this_process_owns(monkeypatch):
    # setup
    monkeypatch.setattr(atexit, "register", lambda f: None)
    runlock.claim()
    # execute
    runlock.release()
    # assert
    assert not runlock.STATE.exists()


def test_release_keeps_another_runs_record(live_pid):
    # setup
    record(live_pid)
    # execute
    runlock.release()
    # assert
    assert runlock.owner()["pid"] == live_pid


# -- busy_line ------------------------------------------------------------------------------
def test_busy_line_names_a_live_run_of_this_host(live_pid, utc):
    # setup: started at 2024-01-02 03:04:05 UTC
    record(live_pid, started=1704164645.0)
    # execute
    line = runlock.busy_line()
    # assert
    assert line == (f"another run is working in this directory (pid {live_pid}, started "
                    "2024-01-02 03:04:05): two runs on one artifacts tree would overwrite each "
                    f"other's outputs. Fix: wait for it to finish, or stop it (kill {live_pid}) "
                    "and rerun; finished jobs are kept")
    assert "\n" not in line


def test_not_busy_without_a_record_for_a_gone_run_or_for_this_process(dead_pid):
    # execute / assert
    assert runlock.busy_line() is None
    record(dead_pid)
    assert runlock.busy_line() is None
    record(os.getpid())  # this run's own record (onstart ran in this process)
    assert runlock.busy_line() is None


# -- remove_stale_locks ---------------------------------------------------------------------
def test_a_gone_runs_locks_are_removed_with_one_line(dead_pid, capsys):
    # setup
    record(dead_pid)
    locks("0.input.lock", "0.output.lock")
    # execute
    runlock.remove_stale_locks()
    # assert
    assert list(runlock.LOCKS.iterdir()) == []
    assert not runlock.STATE.exists()
    err = capsys.readouterr().err
    assert err == (f"engineforge: removed the locks of an earlier run that is gone (pid "
                   f"{dead_pid}); outputs it left half-written are not trusted and will be "
                   "rebuilt\n")


def test_a_gone_runs_record_without_locks_is_removed_silently(dead_pid, capsys):
    # setup
    record(dead_pid)
    # execute
    runlock.remove_stale_locks()
    # assert
    assert not runlock.STATE.exists()
    assert capsys.readouterr().err == ""


def test_a_live_runs_locks_are_kept(live_pid, capsys):
    # setup
    record(live_pid)
    locks("0.input.lock")
    # execute
    runlock.remove_stale_locks()
    # assert
    assert [p.name for p in runlock.LOCKS.iterdir()] == ["0.input.lock"]
    assert runlock.owner()["pid"] == live_pid
    assert capsys.readouterr().err == ""


def test_this_processs_own_locks_are_kept(capsys):
    # setup
    record(os.getpid())
    locks("0.input.lock")
    # execute
    runlock.remove_stale_locks()
    # assert
    assert [p.name for p in runlock.LOCKS.iterdir()] == ["0.input.lock"]
    assert runlock.owner()["pid"] == os.getpid()
    assert capsys.readouterr().err == ""


def test_locks_without_a_record_are_left_to_snakemake(capsys):
    """Locks no engineforge run recorded (another tool, or an older version) are not ours
    to judge: they stay."""
    # setup
    locks("0.input.lock")
    # execute
    runlock.remove_stale_locks()
    # assert
    assert [p.name for p in Path(".snakemake/locks").iterdir()] == ["0.input.lock"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("pid", ["dead", "this"])
def test_a_run_on_another_host_keeps_its_locks_and_makes_the_directory_busy(
        pid, dead_pid, utc, capsys):
    """A shared file system: the record of a run on another node cannot be checked from
    here (its pid means nothing on this host), so it counts as alive, whatever the pid."""
    # setup
    other = f"{HOST}-other-node"
    record(dead_pid if pid == "dead" else os.getpid(), host=other, started=0.0)
    locks("0.input.lock")
    # execute
    runlock.remove_stale_locks()
    line = runlock.busy_line()
    runlock.release()
    # assert: nothing removed, the directory busy, the line names the host and the way out
    assert [p.name for p in runlock.LOCKS.iterdir()] == ["0.input.lock"]
    assert runlock.owner()["host"] == other
    assert capsys.readouterr().err == ""
    assert line is not None and f"on host {other}" in line
    assert f"delete {runlock.STATE} and rerun with --unlock" in line
