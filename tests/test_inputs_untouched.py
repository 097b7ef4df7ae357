"""Stages never write to their inputs.

Checked on the e2e zoo of tests/conftest.py (the run test_workflow_e2e.py checks, built once
per session): every stage ran there on tiny models — export, simplify, precision
fp32/fp16/bf16/int8, audit, builds for onnxruntime and tensorrt-rtx, bench and the PyTorch
baseline. After that run:

- every input a sidecar records still has the content the job hashed before it ran;
- every output still has the content its sidecar vouches for;
- the workspace's own files (checkpoint, calibration and evaluation data, model source,
  config) are byte for byte what they were before the run;
- no directory holding a stage input has an entry that was not there before the run and
  that no job declared (a library writing beside its input).

ModelOpt's in-place shape inference (the bug: it rewrote simplify/model.onnx) leaves the
tiny e2e graphs byte for byte as they are, so the int8 precision body also runs on a copy
whose shape information was dropped, which that inference does rewrite: the current body
must leave it untouched (a regression of the fix fails here), and as positive controls the
same check flags the body as it was before the fix, and a body that leaves a file beside
its input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
from conftest import E2E_PRECISIONS as PRECISIONS
from conftest import run_stage, tiny_raw_config
from engineforge import config
from engineforge.runner import StageFailed
from engineforge.sidecar import read_json, sha256_file
from engineforge.stages import precision
from workflow_helpers import CACHE_OFF

pytestmark = pytest.mark.e2e

# The run's own entries at the workspace root, beside the user's files: the artifacts tree,
# Snakemake's metadata, and the tests' MLflow store (MLFLOW_TRACKING_URI=sqlite:///<ws>/…).
RUN_ENTRIES = {"artifacts", ".snakemake", "mlruns", "mlflow.db"}


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*")
            if p.is_file()}


def sidecars(root: Path) -> dict[Path, dict]:
    """Every stage sidecar under ``root`` (not MLflow's copies of them)."""
    found = {}
    for p in sorted(root.rglob("*.json")):
        if p.relative_to(root).parts[0] in (".snakemake", "mlruns"):
            continue
        data = read_json(p)
        if isinstance(data, dict) and "sidecar_version" in data:
            found[p] = data
    return found


def _paths_in(obj, root: Path) -> set[Path]:
    """Files a result names (e.g. a build's log and layer report beside its engine)."""
    if isinstance(obj, dict):
        return set().union(*(_paths_in(v, root) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_paths_in(v, root) for v in obj))
    if isinstance(obj, str) and "\n" not in obj and len(obj) < 1024:
        try:
            return {root / obj} if (root / obj).is_file() else set()
        except OSError:
            return set()
    return set()


def untouched_problems(root: Path, before: dict[str, str]) -> list[str]:
    """What the jobs under ``root`` did to their inputs: one line per problem."""
    problems = []
    found = sidecars(root)
    declared = set(found)
    input_dirs = set()
    for path, side in found.items():
        name = path.relative_to(root).as_posix()
        for kind in ("inputs", "outputs"):
            for role, rec in side[kind].items():
                f = root / rec["path"]  # relative to the workflow's directory, or absolute
                declared.add(f)
                if kind == "inputs":
                    input_dirs.add(f.parent)
                if not f.is_file():
                    problems.append(f"{name}: {kind[:-1]} {role} {rec['path']} is gone")
                elif sha256_file(f) != rec["sha256"]:
                    problems.append(f"{name}: {kind[:-1]} {role} {rec['path']} changed "
                                    "after the job hashed it")
        declared |= _paths_in(side.get("result"), root)
    for rel, digest in sorted(before.items()):
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel}: there before the run, gone")
        elif sha256_file(f) != digest:
            problems.append(f"{rel}: there before the run, changed")
    declared |= {d for f in list(declared) for d in f.parents}  # directories of declared files
    existed = {root / rel for rel in before}
    existed |= {d for f in list(existed) for d in f.parents}
    for d in sorted(input_dirs):
        for entry in sorted(d.iterdir()):
            if entry in declared or entry in existed:
                continue
            if d == root and entry.name in RUN_ENTRIES:
                continue
            problems.append(f"{entry.relative_to(root).as_posix()}: new beside a stage "
                            "input, declared by no job")
    return problems


def test_no_stage_wrote_to_its_inputs(e2e_zoo):
    # setup: the e2e run, and the workspace as it was before it
    ws, before = e2e_zoo.ws, e2e_zoo.before
    found = sidecars(ws).values()
    # the check covers every stage and variant (not an empty loop)
    assert {s["stage"] for s in found} == {"export", "simplify", "precision", "build",
                                           "audit", "bench", "baseline", "profiles",
                                           "ort_quantize", "localise"}
    assert {s["config"]["precision"] for s in found if s["stage"] == "precision"} == set(
        PRECISIONS)
    assert {s["config"]["backend"] for s in found if s["stage"] == "build"} == {
        "onnxruntime", "tensorrt-rtx"}
    assert {"tinycls.pt", "calib.npz", "eval.npz", "calib_fcn.npz", "tinynets.py",
            "config.yaml"} <= set(before)
    # execute
    problems = untouched_problems(ws, before)
    # assert
    assert problems == []


def _pre_fix_qdq(job, onnx_in: Path, out: Path) -> dict:
    """The int8/fp8 body before the fix: ModelOpt quantizes the published input itself."""
    s = job.settings.method
    data = precision._calibration(job.model, job.settings.inputs, job.precision,
                                  job.inputs.get("calibration"), s.calib_size)
    precision._quantize(job, s, onnx_in, out, data)
    return {"calibration_samples": len(next(iter(data.values())))}


ORIGINAL_QDQ = precision._qdq


def _leaves_a_file_beside(job, onnx_in: Path, out: Path) -> dict:
    """A body that works on a private copy but leaves an intermediate beside its input
    (as ModelOpt's ``<name>_static.onnx`` would)."""
    shutil.copyfile(onnx_in, onnx_in.with_name(f"{onnx_in.stem}_static.onnx"))
    return ORIGINAL_QDQ(job, onnx_in, out)


@pytest.mark.parametrize("body, expected", [
    (ORIGINAL_QDQ, []),
    # the runner itself refuses it now (no sidecar vouches for the result); the check still
    # sees the input changed
    (_pre_fix_qdq, ["inputs/model.onnx: there before the run, changed"]),
    (_leaves_a_file_beside, ["inputs/model_static.onnx: new beside a stage input, declared "
                             "by no job"]),
], ids=["fixed", "pre-fix-rewrites-input", "writes-beside-input"])
def test_int8_input_untouched_and_misbehaviour_flagged(e2e_zoo, tmp_path, monkeypatch, body,
                                                      expected):
    """The current int8 body leaves its input alone; the check flags the misbehaving ones.
    The body runs in this process (ENGINEFORGE_ISOLATION=0) so that a replaced body is the
    one that runs; everything else is the real runner."""
    # setup: copies of the e2e run's int8 inputs; the model without the shape information
    # onnxsim leaves (as an export kept unsimplified has it), which ModelOpt's in-place
    # shape inference adds
    ws = e2e_zoo.ws
    root = tmp_path
    (root / "inputs").mkdir()
    model = onnx.load(str(ws / "artifacts/tinycls/simplify/model.onnx"))
    del model.graph.value_info[:]
    onnx.save(model, str(root / "inputs/model.onnx"))
    shutil.copyfile(ws / "calib.npz", root / "inputs/calib.npz")
    before = snapshot(root)
    monkeypatch.setenv("ENGINEFORGE_ISOLATION", "0")
    for var, value in CACHE_OFF.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(precision, "_qdq", body)
    models = config.resolve(tiny_raw_config(precisions=("fp32", "int8")), ws)["models"]
    args = ("precision", models, "tinycls",
            {"onnx": root / "inputs/model.onnx", "calibration": root / "inputs/calib.npz"},
            {"onnx": root / "out/model.onnx", "sidecar": root / "out/precision.json"},
            root)
    # execute
    if body is _pre_fix_qdq:
        with pytest.raises(StageFailed, match=r"modified its input\(s\) onnx"):
            run_stage(*args, precision="int8")
        assert not (root / "out/precision.json").exists()
    else:
        side = run_stage(*args, precision="int8")
        # the job succeeded (the quantized model is there)
        assert side["result"]["quantize_linear"] == 2
    # assert: only misbehaviour is flagged
    assert untouched_problems(root, before) == [e.format(root=root) for e in expected]
