"""Crash isolation: a stage body runs in its own child process, forked from a warm server.

Native libraries (TensorRT builders, engine and package loads, ONNX Runtime sessions of
untrusted graphs) can segfault, abort or run out of memory. Each job's body therefore runs
in a child forked from a multiprocessing *fork server* that imported the heavy libraries
once (torch, ONNX, ONNX Runtime, onnxsim, ModelOpt, Polygraphy): it shares no state with
the jobs running beside it (no locks), and a crash fails that job alone with the signal and
its log path. Heavy, stateful stages (export, precision) get a fresh child per job; the
many small jobs of a lane (builds, audits and benches of one backend) reuse a warm worker
of that lane, which saves the fork and the first touch of the libraries' memory (~0.1-0.4 s
a job); a worker that crashes fails its job and is replaced. A child exits when the
Snakemake process goes away (Ctrl-C), and the parent kills one that outlives the job's time
limit.

Where Snakemake runs every job as its own process (cluster executors: Slurm, Kubernetes,
cluster-generic), that process already isolates the job: bodies run in it directly
(``JOB_PROCESS``), with no fork server to start per job.
``ENGINEFORGE_ISOLATION=0`` runs bodies in the calling thread too (debugging only).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from engineforge.errors import EngineforgeError, JobCancelled, JobCrashed, JobTimedOut

# Imported once by the fork server, so that forked jobs start warm (a fork costs ~25 ms;
# importing ModelOpt in a job ~1.3 s, the dynamo exporter stack ~0.6 s, onnxsim ~0.5 s).
# Not polygraphy.backend.trt: it binds one TensorRT flavour at import, per job.
# engineforge.worker first: it sends the server's own output to its log (_quiet_server).
PRELOAD = ["engineforge.worker", "numpy", "onnx", "onnxruntime", "torch", "torch._dynamo",
           "onnxscript", "torch.onnx._internal.exporter._core", "onnxsim", "polygraphy.comparator",
           "polygraphy.backend.onnxrt", "modelopt.onnx.autocast", "modelopt.onnx.quantization",
           "engineforge.runner", "engineforge.stages.export", "engineforge.stages.precision",
           "engineforge.stages.audit", "engineforge.stages.build", "engineforge.stages.bench"]
# ModelOpt's import initialises the CUDA driver: on an H100, every child forked after it
# failed "CUDA driver initialization failed". Where a GPU is present, jobs import it.
GPU_UNSAFE_PRELOAD = ("modelopt.",)
_CTX_LOCK = threading.Lock()
_ctx = None
JOB_PROCESS = False  # set by the workflow when this process runs one job (remote execution)
_STOP = threading.Event()  # set by Ctrl-C / SIGTERM: running children are killed at once
_STOP_REASON = ["interrupted"]
_POLL_S = 0.2
SERVER_LOG_VAR = "_ENGINEFORGE_SERVER_LOG"  # the fork server's output goes there
_server_log: str | None = None


def gpu_present() -> bool:
    """An NVIDIA GPU's device nodes exist (asking CUDA would initialise it here)."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0",
                                           "/proc/driver/nvidia/version"))


def preload() -> list[str]:
    """What the fork server imports: PRELOAD, less what would break CUDA in its children."""
    gpu = gpu_present()
    return [m for m in PRELOAD if not (gpu and m.startswith(GPU_UNSAFE_PRELOAD))]


def enabled() -> bool:
    if JOB_PROCESS:
        return False
    return os.environ.get("ENGINEFORGE_ISOLATION", "1") not in ("0", "false", "no")


def _context():
    global _ctx
    with _CTX_LOCK:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(preload())
            # Python 3.11's fork server ignores the sys.path it is given: hand it ours (the
            # workflow's own engineforge and models/ first) through PYTHONPATH while it starts.
            saved = {v: os.environ.get(v) for v in ("PYTHONPATH", SERVER_LOG_VAR)}
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            if _server_log:
                os.environ[SERVER_LOG_VAR] = str(Path(_server_log).resolve())
            try:
                from multiprocessing import forkserver

                forkserver.ensure_running()
            finally:
                for var, value in saved.items():
                    if value is None:
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = value
            _ctx = ctx
        return _ctx


def start(log_path: str | None = None) -> None:
    """Start the fork server now, in the background (it imports for a few seconds), and
    make Ctrl-C / SIGTERM stop running jobs at once. Call from the main thread.
    ``log_path``: where its own output goes (the preloaded libraries' messages about this
    machine, e.g. ModelOpt's "Failed to get GPU count" without a GPU), not the terminal."""
    global _server_log
    _server_log = log_path
    stop_on_signals()
    if enabled():
        threading.Thread(target=_context, name="engineforge-forkserver", daemon=True).start()


def stop_on_signals() -> None:
    """Snakemake answers SIGTERM by waiting for the running jobs to finish, and Ctrl-C by
    waiting for its job threads: a job that runs for an hour would hold the run for an hour.
    Chain a handler in front of Snakemake's: it kills the jobs' children (their jobs fail as
    "stopped"), then Snakemake's own handler stops scheduling and exits."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if getattr(previous, "_engineforge", False):
            continue

        def handler(signum, frame, previous=previous):
            stop(signal.Signals(signum).name)
            if previous is signal.default_int_handler:
                previous(signum, frame)  # KeyboardInterrupt, in the main thread
            elif callable(previous):
                # Snakemake's SIGTERM handler takes the scheduler's (non-reentrant) lock,
                # which this very thread may hold right now: call it from another thread.
                threading.Thread(target=previous, args=(signum, frame), daemon=True,
                                 name="engineforge-stop").start()
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        handler._engineforge = True
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave Snakemake's handling as it is
            return


def stop(reason: str = "interrupted") -> None:
    """Kill every running job's child now and make new ones fail at once."""
    _STOP_REASON[0] = reason
    _STOP.set()
    with _IDLE_LOCK:
        for workers in _IDLE.values():
            for w in workers:
                if w.proc.is_alive():
                    w.proc.kill()
        _IDLE.clear()


def _die_with_parent() -> None:
    """Exit when the process that started this job is gone (Ctrl-C, kill of the run)."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="engineforge-parent-watch", daemon=True).start()


def _log_to(log_path: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(log_path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _output_to(log_path: str) -> None:
    """The job's stdout and stderr (Polygraphy's console, native libraries' prints) go to
    its log, not to the terminal the run reports to."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _execute(conn, target: str, args: tuple, log_path: str, env: dict, cwd: str) -> None:
    """Run one job in this (child) process and send its reply."""
    # The fork server's environment and directory are those it started with: use the
    # caller's, now.
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    _log_to(log_path)
    _output_to(log_path)
    try:
        reply = ("ok", call(target, *args))
    except EngineforgeError as err:
        logging.getLogger("engineforge").error("%s", err)
        reply = ("error", err)
    except BaseException as err:  # noqa: BLE001 - reported to the parent as one line
        logging.getLogger("engineforge").error("unexpected error:\n%s", traceback.format_exc())
        reply = ("unexpected", f"{type(err).__name__}: "
                               f"{(str(err).strip().splitlines() or [''])[0][:300]}")
    try:
        conn.send(reply)
    except Exception as err:  # noqa: BLE001 - e.g. an unpicklable result
        conn.send(("unexpected", f"result not transferable: {type(err).__name__}: {err}"))
    for h in list(logging.getLogger().handlers):
        h.close()


def _child(conn, target: str, args: tuple, log_path: str, env: dict, cwd: str) -> None:
    """A process for one job."""
    import multiprocessing.connection  # noqa: F401 - used by the watcher thread

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _execute(conn, target, args, log_path, env, cwd)
    conn.close()


def _serve(conn) -> None:
    """A warm worker: runs the jobs of one lane, one after the other, until the pipe closes."""
    import multiprocessing.connection  # noqa: F401 - used by the watcher thread

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        _execute(conn, *request)


def call(target: str, *args):
    """Call ``"package.module:function"`` with ``args`` in this process."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(*args)


def _wait(objects: list, timeout_s: float | None) -> list:
    """multiprocessing.connection.wait in short slices, so that a stop is seen at once."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if _STOP.is_set():
            return []
        left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
        if left <= 0:
            return []
        ready = multiprocessing.connection.wait(objects, timeout=left)
        if ready:
            return ready


def _check_stopped(job: str) -> None:
    if _STOP.is_set():
        raise JobCancelled(f"{job} was stopped: the run got {_STOP_REASON[0]}",
                           fix="rerun when ready; finished jobs are kept")


class UnexpectedError(Exception):
    """A bug or an unforeseen library failure in the child; its traceback is in the log."""


class _Worker:
    def __init__(self, ctx, lane: str):
        self.conn, child = ctx.Pipe(duplex=True)
        # daemon: ended with this process (at exit, multiprocessing terminates daemons and
        # would wait forever on a non-daemon worker idling for its next job)
        self.proc = ctx.Process(target=_serve, args=(child,), name=f"engineforge:{lane}",
                                daemon=True)
        self.proc.start()
        child.close()


_IDLE: dict[str, list[_Worker]] = {}   # lane -> warm workers waiting for a job
_IDLE_LOCK = threading.Lock()


def _take(ctx, lane: str) -> _Worker:
    with _IDLE_LOCK:
        while _IDLE.get(lane):
            w = _IDLE[lane].pop()
            if w.proc.is_alive():
                return w
    return _Worker(ctx, lane)


def _give_back(lane: str, w: _Worker) -> None:
    with _IDLE_LOCK:
        _IDLE.setdefault(lane, []).append(w)


def run_isolated(target: str, *args, log_path: str | Path, timeout_s: float | None = None,
                 job: str = "job", lane: str | None = None):
    """Run ``target(*args)`` in a child process; return its result or raise its error.

    ``lane``: run it in a warm worker of that lane (a process that ran earlier jobs of the
    same lane and kept its imports and sessions' libraries loaded); None: a fresh child.
    Raises the child's :class:`EngineforgeError` as is, :class:`UnexpectedError` for any
    other exception, :class:`JobCrashed` when the process died (signal or exit code; a warm
    worker is then replaced) and :class:`JobTimedOut` past ``timeout_s``.
    """
    if not enabled():
        return call(target, *args)
    _check_stopped(job)
    ctx = _context()
    request = (target, args, str(log_path), dict(os.environ), os.getcwd())
    if lane is None:
        conn, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, name=f"engineforge:{job}", daemon=False,
                           args=(send, *request))
    else:
        w = _take(ctx, lane)
        conn, proc = w.conn, w.proc
    try:  # from the start: a Ctrl-C right after it must still kill the child
        if lane is None:
            try:
                proc.start()
            finally:
                send.close()
        else:
            conn.send(request)
        ready = _wait([conn, proc.sentinel], timeout_s)
        if not ready:
            proc.kill()
            proc.join()
            _check_stopped(job)
            raise JobTimedOut(f"{job} ran past its time limit of {timeout_s:g} s and was "
                              f"killed; log: {log_path}", fix="raise the stage's time_limits "
                              "setting (or ENGINEFORGE_JOB_TIMEOUT_S), or make the model "
                              "smaller")
        try:
            kind, value = conn.recv() if conn in ready or conn.poll() else ("died", None)
        except (EOFError, OSError):
            kind, value = "died", None
        if lane is None or kind == "died":
            proc.join()
    except BaseException:
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
        raise
    if lane is None:
        conn.close()
    elif kind != "died":
        _give_back(lane, w)
    if kind == "ok":
        return value
    if kind == "error":
        raise value
    if kind == "unexpected":
        raise UnexpectedError(value)
    _check_stopped(job)
    code = proc.exitcode
    how = (f"signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0
           else f"exit code {code}")
    raise JobCrashed(f"{job}: the worker process died with {how}; log: {log_path}",
                     fix="read the log; a native library crashed (or ran out of memory) "
                         "in this job only")


def _quiet_server() -> None:
    """In the fork server (the first module it preloads): its output, and that of the
    imports after it, goes to the log it was given."""
    path = os.environ.pop(SERVER_LOG_VAR, None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _output_to(path)


_quiet_server()
