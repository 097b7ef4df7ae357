"""Crash isolation (workflow/engineforge/worker.py): each job body in its own child process."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, ROOT
from engineforge import worker
from engineforge.errors import ConfigError, JobCrashed, JobTimedOut


def _run(func, *args, tmp_path, **kw):
    return worker.run_isolated(f"worker_targets:{func}", *args, log_path=tmp_path / "job.log",
                               job="test-job", **kw)


def test_result_comes_back(tmp_path):
    assert _run("add", 2, 3, tmp_path=tmp_path) == 5


@pytest.mark.parametrize("func,sig", [("segfault", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_native_crash_fails_the_job_not_the_caller(tmp_path, func, sig):
    # execute
    with pytest.raises(JobCrashed) as err:
        _run(func, tmp_path=tmp_path)
    # assert: one line with the signal and the log path; the caller still works
    text = str(err.value)
    assert sig in text and str(tmp_path / "job.log") in text and "\n" not in text
    assert _run("add", 1, 1, tmp_path=tmp_path) == 2


def test_time_limit_kills_the_child(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(JobTimedOut, match="time limit of 1 s"):
        _run("sleep", 30, tmp_path=tmp_path, timeout_s=1)
    assert time.perf_counter() - t0 < 10


def test_errors_cross_with_model_key_and_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        _run("raise_config_error", tmp_path=tmp_path)
    assert (err.value.model, err.value.key, err.value.fix) == ("m1", "models.m1.x", "use another")
    with pytest.raises(worker.UnexpectedError, match="ValueError: boom$"):
        _run("raise_value_error", tmp_path=tmp_path)
    assert "Traceback" in (tmp_path / "job.log").read_text()  # the traceback is in the log


def test_child_sees_the_callers_current_environment(tmp_path, monkeypatch):
    _run("add", 0, 0, tmp_path=tmp_path)  # the fork server is running from here on
    monkeypatch.setenv("ENGINEFORGE_TEST_VALUE", "now")
    assert _run("env", "ENGINEFORGE_TEST_VALUE", tmp_path=tmp_path) == "now"


def test_tensorrt_flavour_binding_does_not_leak_between_jobs(tmp_path):
    """Polygraphy binds TensorRT or TensorRT-RTX once per process; jobs are processes, so an
    RTX build never stops a later job from binding the other flavour."""
    pytest.importorskip("tensorrt_rtx_bindings")
    assert _run("bind_tensorrt_rtx", tmp_path=tmp_path) == "tensorrt-rtx"
    assert _run("bound_flavour", tmp_path=tmp_path) == (None, False)


def _gone_within(pid: int, timeout: float) -> bool:
    """Wait for the process to end (on a pidfd: no polling, no sleep); True when it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _interrupted_run(tmp_path, hook: str) -> tuple[subprocess.Popen, int]:
    """A "Snakemake" process running one job (a 600 s sleep) whose ``hook`` (code run
    before the job) writes ``ready`` at the moment to interrupt; returns it and the job's
    process id, once both are there (however long a loaded machine takes to start them)."""
    pid_file, ready = tmp_path / "child.pid", tmp_path / "ready"
    script = (f"import sys; sys.path[:0] = [{str(ROOT / 'workflow')!r}, {str(FIXTURES)!r}]\n"
              "from pathlib import Path\n"
              "from engineforge import worker\n"
              f"READY = Path({str(ready)!r})\n"
              f"{hook}\n"
              f"worker.run_isolated('worker_targets:sleep', 600, {str(pid_file)!r}, "
              f"log_path={str(tmp_path / 'job.log')!r})\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 300
    while not (ready.exists() and pid_file.exists() and pid_file.read_text()):
        if parent.poll() is not None or time.monotonic() > deadline:
            parent.kill()
            pytest.fail(f"the job did not start: {parent.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return parent, int(pid_file.read_text())


def _end(parent: subprocess.Popen, child: int) -> None:
    for pid in (child, parent.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    parent.communicate()


@pytest.mark.slow
def test_children_exit_when_the_run_is_interrupted(tmp_path):
    """Ctrl-C while the run waits on its job (where Snakemake's job thread spends the job):
    the job's process is killed before the run exits. Its job sleeps 600 s, so a child
    left to finish would hold the run (or outlive it) far past the bounds below."""
    # setup: the run is waiting on the job when the signal comes
    parent, child = _interrupted_run(
        tmp_path, "wait = worker._wait\n"
                  "def _wait(*args):\n"
                  "    READY.write_text('')\n"
                  "    return wait(*args)\n"
                  "worker._wait = _wait")
    try:
        # execute: Ctrl-C
        parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=60)  # event: the run's exit
        # assert: it stopped on the interrupt, and its job's process is gone
        assert parent.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
        assert _gone_within(child, 10), "the job's child process outlived the interrupted run"
    finally:
        _end(parent, child)


@pytest.mark.slow
def test_children_exit_when_the_run_is_interrupted_as_the_job_starts(tmp_path):
    """Ctrl-C in the moment after the job's process started (a loaded machine made the
    earlier test hit it: the run took 126 s, the length of its job's sleep)."""
    # setup: the interrupt lands as Process.start() returns
    parent, child = _interrupted_run(
        tmp_path, "import multiprocessing.process as mpp, time\n"
                  "start = mpp.BaseProcess.start\n"
                  "def start_then_wait(self):\n"
                  "    start(self)\n"
                  "    READY.write_text('')\n"
                  "    time.sleep(600)\n"
                  "mpp.BaseProcess.start = start_then_wait")
    try:
        # execute: Ctrl-C, then wait for the run to report it (its traceback is printed
        # before the interpreter's exit handlers run)
        parent.send_signal(signal.SIGINT)
        err = ""
        for line in parent.stderr:
            err += line
            if line.startswith("KeyboardInterrupt"):
                break
        # assert
        assert "KeyboardInterrupt" in err, err[-2000:]
        assert _gone_within(child, 10), "the job's child process outlived the interrupt"
    finally:
        _end(parent, child)


def test_staging_left_by_a_killed_run_is_cleaned(tmp_path, tiny_models, tiny_workspace):
    """A killed job leaves its hidden staging directory; the next job there removes it and
    never publishes its contents."""
    import socket

    from conftest import run_stage

    # setup: a stale staging dir of a process that no longer exists, beside the outputs
    out = tiny_workspace / "out"
    stale = out / f".staging-{socket.gethostname()}-999999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_text("half-written")
    export = {"onnx": out / "e/model.onnx", "reference": out / "e/reference.npz",
              "sidecar": out / "e/export.json"}
    run_stage("export", tiny_models, "tinyfcn", {"calibration": "calib_fcn.npz"}, export,
              tiny_workspace)
    # execute
    run_stage("simplify", tiny_models, "tinyfcn", {"onnx": export["onnx"]},
              {"onnx": out / "model.onnx", "sidecar": out / "simplify.json"}, tiny_workspace)
    # assert
    assert not stale.exists()
    assert (out / "model.onnx").read_bytes()[:4] != b"half"
    assert not list(out.glob(".staging-*"))


def test_a_lane_reuses_its_warm_worker_and_replaces_a_crashed_one(tmp_path, monkeypatch):
    # setup / execute: two jobs in one lane, then a crash, then another job
    first = _run("pid", tmp_path=tmp_path, lane="test-lane")
    second = _run("pid", tmp_path=tmp_path, lane="test-lane")
    with pytest.raises(JobCrashed, match="SIGSEGV"):
        _run("segfault", tmp_path=tmp_path, lane="test-lane")
    monkeypatch.setenv("ENGINEFORGE_TEST_VALUE", "lane")
    after = _run("pid", tmp_path=tmp_path, lane="test-lane")
    # assert
    assert first == second != os.getpid()  # warm: the same process ran both jobs
    assert after != first                   # the crashed worker was replaced
    assert _run("env", "ENGINEFORGE_TEST_VALUE", tmp_path=tmp_path, lane="test-lane") == "lane"
    assert _run("pid", tmp_path=tmp_path) not in (first, after)  # no lane: a fresh child


@pytest.mark.parametrize("lane", [None, "test-lane"])
def test_a_jobs_console_output_goes_to_its_log(tmp_path, capfd, lane):
    assert _run("shout", "hello", tmp_path=tmp_path, lane=lane) == "done"
    out, err = capfd.readouterr()
    assert "hello" not in out + err
    log = (tmp_path / "job.log").read_text()
    assert "hello" in log and "native hello" in log


def test_a_bad_time_limit_is_one_line(tiny_models, tiny_workspace, monkeypatch):
    from conftest import run_stage
    from engineforge.runner import StageFailed

    monkeypatch.setenv("ENGINEFORGE_JOB_TIMEOUT_S", "ten minutes")
    out = tiny_workspace / "out"
    with pytest.raises(StageFailed) as err:
        run_stage("export", tiny_models, "tinyfcn", {"calibration": "calib_fcn.npz"},
                  {"onnx": out / "model.onnx", "reference": out / "reference.npz",
                   "sidecar": out / "export.json"}, tiny_workspace)
    line = str(err.value)
    assert "key=ENGINEFORGE_JOB_TIMEOUT_S" in line and "'ten minutes'" in line
    assert "\n" not in line and "Traceback" not in line
