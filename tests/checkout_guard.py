"""A check of the test suite itself: the session fails when the checkout changed under it.

Registered for every run with ``-p checkout_guard`` (pyproject's ``[tool.pytest.ini_options]``).
At session start it records every git-ignored path under the checkout (path, size,
mtime_ns; directories by presence only), and at session end records them again: a path that
is new, changed or gone fails the session (exit status 1) with one line naming it. A test
that needs the project as a working directory (Snakemake's ``.snakemake/``, ``artifacts/``,
the parse-time integrity sweep and stale-lock removal) runs in a copy: the ``project_copy``
fixture below.

Which paths count: only the ones git ignores (``artifacts/``, ``.snakemake/``, ``mlruns/``,
``mlflow.db``, ``benchmarks/results/``, ...), found with one ``git check-ignore --stdin``
call per snapshot. Those are exactly what a run of the workflow writes, and git hides them:
a test that leaves one behind (or rewrites the developer's own outputs) is invisible in
``git status``. Untracked files that are *not* ignored are left out on purpose: they are
new source files a developer (or a tool) writes while the suite runs, they show in ``git
status`` anyway, and a guard that tripped on them would make the suite fail for editing the
code. Tracked files are left out for the same reason. Not walked at all: ``.git``,
``.venv``, ``__pycache__``, ``.pytest_cache``, ``.ruff_cache`` and ``*.egg-info`` (written by
Python, pytest, ruff and pip themselves).

A change can also come from another process writing into the checkout meanwhile (a
``make run`` beside the tests): the lines say what changed, not who changed it.

``ENGINEFORGE_CHECKOUT_GUARD_ROOT`` names another root to guard (tests/test_checkout_guard.py
runs the guard on a temporary git repository); ``ENGINEFORGE_CHECKOUT_GUARD=0`` turns it off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT_VAR = "ENGINEFORGE_CHECKOUT_GUARD_ROOT"
OFF_VAR = "ENGINEFORGE_CHECKOUT_GUARD"
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
CHECKOUT = Path(__file__).resolve().parents[1]

# what a test needs to run the workflow with the project as its working directory
PROJECT_PARTS = ("Snakefile", "config.yaml", "workflow", "models", "calib", "profiles")

Entry = tuple[str, int, int]  # kind ("f" file, "d" directory), size, mtime_ns
Snapshot = dict[str, Entry]


def guarded_root() -> Path:
    return Path(os.environ.get(ROOT_VAR) or CHECKOUT).resolve()


def _skipped(name: str) -> bool:
    return name in SKIP_DIRS or name.endswith(".egg-info")


def _walk(root: Path) -> Snapshot:
    """Every file and directory under ``root`` outside the skipped directories."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _skipped(d)]
        rel = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except FileNotFoundError:  # gone while we looked
                continue
            key = (rel / name).as_posix()
            if name in dirnames and not path.is_symlink():
                found[key] = ("d", 0, 0)  # its files are entries of their own
            else:
                found[key] = ("f", st.st_size, st.st_mtime_ns)
    return found


def snapshot(root: Path) -> Snapshot:
    """The git-ignored paths under ``root`` (one ``git check-ignore`` for all of them)."""
    everything = _walk(root)
    if not everything:
        return {}
    proc = subprocess.run(["git", "-C", str(root), "check-ignore", "--stdin", "-z"],
                          input="\0".join(everything) + "\0", capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: nothing is ignored
        raise RuntimeError(f"git check-ignore failed in {root}: {proc.stderr.strip()}")
    return {p: everything[p] for p in proc.stdout.split("\0") if p in everything}


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """One line per path that is new, changed or removed, sorted by path."""
    lines = []
    for path in sorted(before.keys() | after.keys()):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is None:
            what = "new"
        elif new is None:
            what = "removed"
        else:
            what = "changed"
        lines.append(f"{what}: {path}{'/' if (new or old)[0] == 'd' else ''}")
    return lines


def copy_project(dest: Path) -> Path:
    """The project's workflow files (PROJECT_PARTS) copied to ``dest``, without caches."""
    dest.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake")
    for part in PROJECT_PARTS:
        src = CHECKOUT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=skip, symlinks=True)
        else:
            shutil.copy2(src, dest / part)
    return dest


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """A copy of the project (Snakefile, workflow/, models/, calib/, config.yaml, profiles/)
    for a module's tests to run Snakemake in, or to resolve the demo config's relative paths
    against, instead of the checkout."""
    return copy_project(tmp_path_factory.mktemp("project") / "engineforge")


class CheckoutGuard:
    def __init__(self, root: Path):
        self.root = root
        self.before: Snapshot | None = None
        self.lines: list[str] = []
        self.off_reason = ""

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session):
        try:
            self.before = snapshot(self.root)
        except (OSError, RuntimeError) as err:  # no git, or not a work tree
            self.off_reason = str(err).splitlines()[0]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.before is None:
            return
        self.lines = differences(self.before, snapshot(self.root))
        if not self.lines:
            return
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:  # counted in the last line: "..., 3 checkout paths changed"
            reporter.stats.setdefault("checkout paths changed", []).extend(self.lines)

    # outermost: after the durations and the short test summary, right above the last line
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter):
        result = yield
        if self.off_reason:
            terminalreporter.write_line(f"checkout guard: off ({self.off_reason})", yellow=True)
        if self.lines:
            terminalreporter.section("checkout guard", sep="=", red=True, bold=True)
            terminalreporter.write_line(
                f"the checkout {self.root} changed during the test session (git-ignored "
                "paths; a test must write under its own temporary directory): the session "
                "fails")
            for line in self.lines:
                terminalreporter.write_line(f"checkout changed: {line}", red=True)
        return result


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller guards the run
        return
    if os.environ.get(OFF_VAR, "1") == "0":
        return
    config.pluginmanager.register(CheckoutGuard(guarded_root()), "checkout-guard")
