"""Artifact integrity: `engineforge check`, the parse-time sweep (a mismatched output is
rebuilt, stale temporary files go), and the int8 job no longer rewriting its input.

One tiny zoo (fp32 + int8, onnxruntime) is built once by the real workflow; each test works
on a copy of it (``shutil.copytree`` keeps mtimes, as the tree had them).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge import integrity
from engineforge import sidecar as sc
from engineforge.job import Job
from engineforge.runner import _Staging
from workflow_helpers import (
    ROOT,
    copy_workspace,
    engineforge,
    planned_jobs,
    planned_outputs,
    rehash_sidecars,
    snakemake,
    write_config,
)

pytestmark = pytest.mark.e2e

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT / "workflow"), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("integrity-ws")
    write_tiny_workspace(ws)
    write_config(ws, zoo_config())
    snakemake(ws)
    return ws


def zoo_config() -> dict:
    """fp32 + int8 on onnxruntime; tinycls keeps its TorchScript export unsimplified (no
    shape info in it): the case where ModelOpt's quantize() rewrote the simplify output."""
    raw = tiny_raw_config(precisions=("fp32", "int8"), backends=("onnxruntime",))
    raw["models"]["tinycls"] |= {"export": {"exporter": "torchscript"},
                                 "simplify": {"enabled": False}}
    return raw


@pytest.fixture
def ws(built, tmp_path) -> Path:
    """A copy of the built workspace (artifacts and Snakemake's metadata, mtimes kept)."""
    return copy_workspace(built, tmp_path / "ws")


def check(ws: Path) -> subprocess.CompletedProcess:
    return engineforge("check", "--artifacts", "artifacts", cwd=ws)


def recorded_outputs(artifacts: Path) -> list[Path]:
    """Every output a sidecar records, found independently of integrity.py."""
    found = []
    for side in artifacts.rglob("*.json"):
        data = json.loads(side.read_text())
        if isinstance(data, dict) and "sidecar_version" in data:
            found += [side.parent / Path(r["path"]).name for r in data["outputs"].values()]
    return found


def flip_a_byte(path: Path) -> None:
    """Same size, other content: only a hash can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- engineforge check --------------------------------------------------------------------------
def test_check_passes_on_a_clean_tree(ws):
    # execute
    proc = check(ws)
    # assert: every recorded output was hashed, none differs
    outputs = recorded_outputs(ws / "artifacts")
    sidecars = [s for s in (ws / "artifacts").rglob("*.json")
                if "sidecar_version" in json.loads(s.read_text())]
    assert len(outputs) >= 10
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"OK: {len(outputs)} artifacts in {len(sidecars)} sidecars "
                                   "verified")


def test_check_reports_a_changed_file_a_missing_file_and_a_truncated_sidecar(ws):
    # setup: three faults in three sidecars' branches
    a = ws / "artifacts"
    changed = a / "tinycls/simplify/model.onnx"
    missing = a / "tinyfcn/precision/int8/model.onnx"
    truncated = a / "tinycls/build/onnxruntime/int8/b1-8/build.json"
    flip_a_byte(changed)
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    # execute
    proc = check(ws)
    # assert: exit 1, one line per fault naming its file, no traceback
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("FAILED: 3 problem(s)")
    problems = sorted(line.removeprefix("  - ") for line in lines[1:])
    assert len(problems) == 3, proc.stderr
    assert problems[0].startswith("artifacts/tinycls/build/onnxruntime/int8/b1-8/build.json: "
                                  "sidecar not valid JSON")
    assert problems[1].startswith("artifacts/tinycls/simplify/model.onnx: content differs from "
                                  "simplify.json")
    assert problems[2] == ("artifacts/tinyfcn/precision/int8/model.onnx: missing (recorded in "
                           "precision.json)")
    # check changes nothing
    assert not (a / integrity.QUARANTINE).exists() and truncated.exists()


def test_rehash_sidecars_vouches_for_an_edited_output_again(ws):
    """The shared helper tests use after editing an output (workflow_helpers.rehash_sidecars):
    only the sidecars recording that file change, and check passes again."""
    a = ws / "artifacts"
    edited = a / "tinyfcn/simplify/model.onnx"
    flip_a_byte(edited)
    (problem,) = integrity.check(a).problems  # positive control: the edit is seen
    assert "tinyfcn/simplify/model.onnx: content differs from simplify.json" in problem
    # execute
    changed = rehash_sidecars(a, edited)
    # assert
    assert [p.relative_to(a).as_posix() for p in changed] == ["tinyfcn/simplify/simplify.json"]
    assert integrity.check(a).problems == []
    assert check(ws).returncode == 0


@pytest.mark.parametrize("where", ["missing", "file"])
def test_check_of_no_artifacts_directory_is_one_line(tmp_path, where):
    if where == "file":
        (tmp_path / "artifacts").write_text("not a directory")
    proc = check(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "engineforge: [stage=integrity key=artifacts] artifacts directory 'artifacts' "
        + ("does not exist." if where == "missing" else "is not a directory.")
        + " Fix: pass --artifacts <dir> of a built tree"]


# -- the int8 job and its input (issue: the simplify sidecar disagreed with its file) ------------
def test_a_built_tree_with_int8_agrees_with_its_sidecars_and_leaves_no_temp_files(built):
    """ModelOpt's quantize() runs onnx.shape_inference.infer_shapes_path(onnx_path), which
    rewrites the file it is given (it adds value_info to a model without it, e.g. a
    TorchScript export kept unsimplified): the precision stage hands it a private copy."""
    a = built / "artifacts"
    side = json.loads((a / "tinycls/simplify/simplify.json").read_text())
    assert side["result"]["kept_reason"] == "simplify.enabled is false"
    assert json.loads((a / "tinycls/precision/int8/precision.json").read_text())["result"][
        "quantize_linear"] > 0  # the int8 job really quantized
    assert sc.sha256_file(a / "tinycls/simplify/model.onnx") == side["outputs"]["onnx"]["sha256"]
    report = integrity.check(a)
    assert report.problems == [] and report.hashed == len(recorded_outputs(a))
    assert sorted(p.relative_to(a) for p in a.rglob(".*")) == []  # no staging/scratch/tmp left


# -- the parse-time sweep -----------------------------------------------------------------------
def test_a_modified_output_is_quarantined_and_only_its_branch_is_rebuilt(ws):
    # setup: positive control, a clean tree plans nothing
    assert planned_jobs(ws) == {}
    engine = ws / "artifacts/tinyfcn/build/onnxruntime/int8/small/engine.onnx"
    original = engine.read_bytes()
    flip_a_byte(engine)
    # execute
    proc = snakemake(ws, "--dry-run")
    jobs = planned_outputs(ws)
    # assert: one line; the engine, its sidecar, the results built from it and the model's
    # tracking record moved aside (nothing lost)
    said = [line for line in proc.stderr.splitlines() if line.startswith("engineforge:")]
    assert len(said) == 2, proc.stderr
    assert said[0].startswith("engineforge: artifacts/tinyfcn/build/onnxruntime/int8/small/"
                              "engine.onnx does not match its sidecar build.json (content "
                              "changed: sha256 ")
    assert "; it will be rebuilt (moved to artifacts/_quarantine/" in said[0]
    assert said[1] == ("engineforge: 2 result(s) built from them are rebuilt too (moved there "
                       "as well)")
    assert not engine.exists()
    (kept,) = (ws / "artifacts/_quarantine").glob("*")
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "tinyfcn/audit/onnxruntime/int8.json", "tinyfcn/bench/onnxruntime/int8/small.json",
        "tinyfcn/build/onnxruntime/int8/small/build.json",
        "tinyfcn/build/onnxruntime/int8/small/engine.onnx", "tinyfcn/track.json"]
    assert (kept / "tinyfcn/build/onnxruntime/int8/small/engine.onnx").read_bytes() != original
    # assert: exactly that branch: the build, the bench of its profile, the audit of its
    # precision (it runs the first profile's engine) and its localisation, the model's
    # reports, the summary
    by_rule = {}
    for rule, out in jobs:
        by_rule.setdefault(rule, []).append(out)
    assert by_rule == {
        "build_onnxruntime": ["artifacts/tinyfcn/build/onnxruntime/int8/small/engine.onnx"],
        "bench": ["artifacts/tinyfcn/bench/onnxruntime/int8/small.json"],
        "audit": ["artifacts/tinyfcn/audit/onnxruntime/int8.json"],
        "localise": ["artifacts/tinyfcn/audit/localise/int8.json"],
        "drift_matrix": ["artifacts/tinyfcn/audit/drift.json"],
        "report_model": ["artifacts/tinyfcn/report/drift_heatmap.png"],
        "report_html": ["artifacts/report.html"],
        "track": ["artifacts/tinyfcn/track.json"],
        "summary": ["artifacts/summary.md"], "all": [""]}, jobs
    # execute: the rebuild; assert: the tree verifies, the rerun is a no-op and quiet
    snakemake(ws)
    assert engine.read_bytes() == original  # the same engine as first built
    assert check(ws).returncode == 0
    rerun = snakemake(ws, "--dry-run")
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    assert "engineforge:" not in rerun.stderr


def test_a_truncated_sidecar_is_quarantined_with_what_was_built_from_its_outputs(ws):
    # setup: every tinycls sidecar but the export's and the PyTorch baseline's is built
    # from the simplified model
    a = ws / "artifacts"
    downstream = sorted(p.relative_to(a).as_posix() for p in (a / "tinycls").rglob("*.json")
                        if "sidecar_version" in json.loads(p.read_text())
                        and p.parent.name not in ("export", "pytorch", "profiles"))
    # simplify, 2 precisions, ort_quantize (onnxruntime int8), 2 builds, 2 audits, 2 benches,
    # the int8 localisation
    assert len(downstream) == 11
    side = a / "tinycls/simplify/simplify.json"
    side.write_bytes(side.read_bytes()[:100])
    # execute
    said = io.StringIO()
    report = integrity.sweep(a, out=said)
    # assert
    assert [p.relative_to(a).as_posix() for p in report.quarantined] == downstream
    assert said.getvalue().splitlines()[0].startswith(
        f"engineforge: {side} is not a trustworthy sidecar (not valid JSON")
    assert said.getvalue().splitlines()[1].startswith("engineforge: 10 result(s) built from")
    assert not side.exists() and not (a / "tinycls/track.json").exists()
    assert (a / "tinycls/export/export.json").exists() and (a / "tinyfcn/track.json").exists()


def test_sweep_of_an_unchanged_tree_hashes_nothing(ws, monkeypatch):
    # setup: count every hash the sweep takes
    calls = []
    real = sc.sha256_file
    monkeypatch.setattr(sc, "sha256_file", lambda p, *a: calls.append(Path(p)) or real(p, *a))
    a = ws / "artifacts"
    n = len(recorded_outputs(a))
    # execute / assert: every output looked at, none hashed
    report = integrity.sweep(a)
    assert (report.outputs, report.hashed, calls, report.problems) == (n, 0, [], [])
    # positive control: a new mtime (same bytes) is hashed once, trusted, then remembered
    touched = a / "tinycls/precision/fp32/model.onnx"
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    report = integrity.sweep(a)
    assert (report.hashed, calls, report.problems) == (1, [touched], [])
    assert integrity.sweep(a).hashed == 0 and calls == [touched]


def test_a_sidecar_without_mtime_is_hashed_once(ws):
    """Sidecars written before mtime_ns was recorded."""
    side = ws / "artifacts/tinycls/export/export.json"
    data = json.loads(side.read_text())
    for rec in data["outputs"].values():
        del rec["mtime_ns"]
    side.write_text(json.dumps(data))
    first = integrity.sweep(ws / "artifacts")
    second = integrity.sweep(ws / "artifacts")
    assert (first.hashed, second.hashed) == (len(data["outputs"]), 0)
    assert first.problems == second.problems == []


def test_a_tree_restored_from_the_mlflow_cache_verifies_without_hashing(built, tmp_path,
                                                                       monkeypatch):
    """The cache writes outputs itself (not through the runner's staging): their record is
    the restored copy's, so the sweep trusts them without a hash and check passes."""
    # setup / execute: a second clone of the zoo against the first one's tracking store
    clone = tmp_path / "clone"
    write_tiny_workspace(clone)
    write_config(clone, zoo_config())
    snakemake(clone, env={"MLFLOW_TRACKING_URI": f"sqlite:///{built}/mlflow.db"})
    a = clone / "artifacts"
    restored = [p for p in a.rglob("*.json") if json.loads(p.read_text()).get("cache")]
    # export, simplify, precision, ort_quantize (onnxruntime int8), build: all hits
    assert len(restored) == 2 + 2 + 4 + 2 + 6
    calls = []
    real = sc.sha256_file
    monkeypatch.setattr(sc, "sha256_file", lambda p, *a: calls.append(Path(p)) or real(p, *a))
    report = integrity.sweep(a)
    assert (report.outputs, report.hashed, calls, report.problems) == (
        len(recorded_outputs(a)), 0, [], [])
    assert check(clone).returncode == 0


# -- stale temporary files ---------------------------------------------------------------------
KILLED_WRITER = """
import os, signal, sys, tempfile
from pathlib import Path
from engineforge.job import Job
from engineforge.runner import _Staging
from engineforge.sidecar import atomic_path, scratch_prefix

export, precision = Path(sys.argv[1]), Path(sys.argv[2])
_Staging(Job(stage="export", model="m", wildcards={}, inputs={},
             outputs={"sidecar": export / "export.json"}, settings=None, tools={},
             device=None, log=export / "export.log"))
tempfile.mkdtemp(prefix=scratch_prefix(), dir=precision)  # the int8 job's ModelOpt scratch
with atomic_path(export / "model.onnx") as tmp:
    tmp.write_bytes(b"half an ONNX")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_dead_writers_temporary_files_are_removed_a_live_ones_kept(tmp_path):
    # setup: a writer SIGKILLed mid-write, in a model tree
    a = tmp_path / "artifacts"
    export, precision = a / "m/export", a / "m/precision/int8"
    precision.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(export), str(precision)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = sorted([*export.glob(".*"), *precision.glob(".*")])
    assert len(dead) == 3  # positive control: staging dir, scratch dir, .model.onnx.*.tmp
    # setup: what must stay: this process's own (live), another host's (cannot tell),
    # a pid-less temp file touched recently, a hidden file that is no temp file
    # (the runner removes dead staging dirs where it stages: a live one goes elsewhere)
    live_staging = _Staging(Job(stage="simplify", model="m", wildcards={}, inputs={},
                                outputs={"sidecar": a / "m/simplify/simplify.json"},
                                settings=None, tools={}, device=None, log=export / "x.log"))
    live_scratch = Path(tempfile.mkdtemp(prefix=sc.scratch_prefix(), dir=precision))
    dead_pid = int(next(integrity.TEMP_FILE.match(p.name) for p in dead
                        if p.name.endswith(".tmp"))["pid"])
    other_host = [export / f".model.onnx.{dead_pid}@elsewhere.abc.tmp",
                  export / f".staging-elsewhere-{dead_pid}-0123abcd"]
    other_host[0].touch()
    other_host[1].mkdir()
    legacy_old, legacy_new = export / ".model.onnx.k3j4h5l6.tmp", export / ".ref.npz.a1b2.tmp"
    legacy_old.touch()
    legacy_new.touch()
    two_hours_ago = time.time() - 7200
    os.utime(legacy_old, (two_hours_ago, two_hours_ago))
    (export / ".keep").touch()
    with sc.atomic_path(export / "model.onnx") as live_tmp:
        live_tmp.write_bytes(b"being written")
        # execute
        said = io.StringIO()
        report = integrity.sweep(a, out=said)
        # assert
        assert sorted(report.removed) == sorted(dead + [legacy_old])
        assert not any(p.exists() for p in dead + [legacy_old])
        kept = [live_tmp, *live_staging.dirs.values(), live_scratch, *other_host, legacy_new,
                export / ".keep"]
        assert all(p.exists() for p in kept), [p for p in kept if not p.exists()]
        assert said.getvalue() == (f"engineforge: removed 4 temporary file(s) or staging "
                                   f"dir(s) a killed run left under {a}\n")
    assert (export / "model.onnx").read_bytes() == b"being written"
    live_staging.cleanup()


@pytest.mark.parametrize("host", ["vm", "node-12", "gpu-3.cluster.example.org"])
def test_temp_names_carry_their_writer(tmp_path, monkeypatch, host):
    """Whatever the host name (dashes, digits, dots), the sweep reads back pid and host."""
    monkeypatch.setattr("socket.gethostname", lambda: host)
    scratch = Path(tempfile.mkdtemp(prefix=sc.scratch_prefix(), dir=tmp_path))
    with sc.atomic_path(tmp_path / "model.onnx") as tmp:
        assert integrity._writer(tmp) == (host, os.getpid())
    assert integrity._writer(scratch) == (host, os.getpid())
    assert integrity._writer(tmp_path / "model.onnx") is False  # not a temp file


def test_an_untrusted_file_that_cannot_be_moved_is_one_line_and_stops_the_parse(ws, monkeypatch,
                                                                               capsys):
    """A read-only tree cannot be made here (tests run as root): os.replace is made to fail
    as it would there."""
    flip_a_byte(ws / "artifacts/tinycls/export/model.onnx")

    def read_only(*_):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(integrity.os, "replace", read_only)
    with pytest.raises(SystemExit) as stop:
        integrity.at_parse(ws / "artifacts")
    assert stop.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    a = f"{ws}/artifacts"
    assert line == (f"engineforge: [stage=integrity key=artifacts] cannot move "
                    f"{a}/tinycls/export/export.json aside (Read-only file system); it is "
                    "untrusted: it, or what it was built from, no longer matches its sidecar. "
                    f"Fix: make {a} writable or delete {a}/tinycls/export, then rerun")
