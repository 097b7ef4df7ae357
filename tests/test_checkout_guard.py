"""The checkout guard (tests/checkout_guard.py) fails a pytest session that changed the
checkout's git-ignored files, one line per path, and passes one that changed nothing.

Each case runs pytest in a subprocess, with the guard loaded as the suite loads it
(``-p checkout_guard``), on a temporary git repository that stands in for the checkout
(ENGINEFORGE_CHECKOUT_GUARD_ROOT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# what the inner session's one test does to the repository (cwd: the repository)
WRITES = """
from pathlib import Path


def test_it():
    Path("artifacts/m").mkdir(parents=True)
    Path("artifacts/m/model.onnx").write_bytes(b"onnx")  # new, in a new ignored directory
    Path("mlflow.db").write_bytes(b"a different database")  # changed
    Path(".snakemake/log/old.log").unlink()  # removed
    Path("new_stage.py").write_text("x = 1\\n")  # a new source file: not the guard's business
    Path("src/__pycache__").mkdir()  # skipped
    Path("src/__pycache__/mod.cpython-311.pyc").write_bytes(b"pyc")
"""
READS = """
from pathlib import Path


def test_it():
    assert Path("mlflow.db").read_bytes() == b"the developer's runs"
    assert Path("artifacts/keep/engine.plan").read_bytes() == b"engine"
"""


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository with a tracked source file, an ignore file, and ignored outputs of
    an earlier run (as a developer's checkout has them)."""
    root = tmp_path / "checkout"
    (root / "src").mkdir(parents=True)
    (root / "src/mod.py").write_text("y = 2\n")
    (root / ".gitignore").write_text("/artifacts/\n/mlflow.db\n/.snakemake/\n__pycache__/\n"
                                     "/.pytest_cache/\n")
    (root / "artifacts/keep").mkdir(parents=True)
    (root / "artifacts/keep/engine.plan").write_bytes(b"engine")
    (root / "mlflow.db").write_bytes(b"the developer's runs")
    (root / ".snakemake/log").mkdir(parents=True)
    (root / ".snakemake/log/old.log").write_text("an old run\n")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "src/mod.py", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return root


def run_guarded(root: Path, test_source: str) -> subprocess.CompletedProcess:
    tests = root.parent / "inner_tests"  # outside the guarded root: writing it is no change
    tests.mkdir()
    (tests / "test_inner.py").write_text(test_source)
    env = {**os.environ, "ENGINEFORGE_CHECKOUT_GUARD_ROOT": str(root),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("ENGINEFORGE_CHECKOUT_GUARD", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "--durations=2",
                           "-p", "checkout_guard",
                           "-p", "no:cacheprovider", "--rootdir", str(tests), "-c", os.devnull,
                           str(tests / "test_inner.py")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def guard_lines(out: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.startswith("checkout changed: ")]


def test_a_session_that_writes_into_the_checkout_fails_naming_each_path(repo):
    proc = run_guarded(repo, WRITES)
    out = proc.stdout + proc.stderr
    assert "1 passed" in out, out  # the test itself passed: the guard failed the session
    assert proc.returncode == 1, out
    assert guard_lines(out) == ["checkout changed: removed: .snakemake/log/old.log",
                                "checkout changed: new: artifacts/m/",
                                "checkout changed: new: artifacts/m/model.onnx",
                                "checkout changed: changed: mlflow.db"], out
    assert "new_stage.py" not in out and "__pycache__" not in out
    # below the durations and the short summary, and counted in the last line
    lines = out.splitlines()
    first = lines.index("checkout changed: removed: .snakemake/log/old.log")
    assert first > max(i for i, ln in enumerate(lines) if "short test summary" in ln
                       or "slowest 2 durations" in ln)
    assert "1 passed, 4 checkout paths changed in" in lines[-1]


def test_a_session_that_leaves_the_checkout_alone_passes(repo):
    """The control: the same repository and outputs, read but not written."""
    proc = run_guarded(repo, READS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed" in out and guard_lines(out) == [] and "checkout guard" not in out


def test_the_guard_is_on_in_this_session(request):
    """The suite's own run is guarded (pyproject's addopts), over this checkout."""
    guard = request.config.pluginmanager.get_plugin("checkout-guard")
    if os.environ.get("ENGINEFORGE_CHECKOUT_GUARD") == "0":
        pytest.skip("turned off with ENGINEFORGE_CHECKOUT_GUARD=0")
    assert guard is not None and guard.before is not None, getattr(guard, "off_reason", "")
    if not os.environ.get("ENGINEFORGE_CHECKOUT_GUARD_ROOT"):
        assert guard.root == TESTS.parent
