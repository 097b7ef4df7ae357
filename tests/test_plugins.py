"""Plug-in architecture, proven on a copy of the workflow:

- a new backend is one module plus one registry line: nothing else is edited, and it gets
  build rules, engine paths, schema enum, audit rows, benches, summary rows and MLflow runs;
- a backend whose build segfaults fails only its own jobs: the other backends' results are
  all there, and the failure is one line with the signal and the log path.
"""

from __future__ import annotations

import filecmp
import json
import shutil

import pytest
from conftest import FIXTURES, tiny_raw_config, write_tiny_workspace
from workflow_helpers import ROOT, mlflow_client, snakemake, write_config

pytestmark = pytest.mark.e2e

REGISTRY = "workflow/engineforge/backends/__init__.py"


def _copy_workflow(dest):
    for part in ("Snakefile", "workflow", "profiles"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / part)


def _plug_in(copy, fixture: str, name: str, cls: str) -> None:
    """What the architecture doc's checklist says: add the module, add one registry line."""
    module = fixture.removesuffix(".py")
    shutil.copy(FIXTURES / "plugins" / fixture, copy / "workflow/engineforge/backends" / fixture)
    registry = copy / REGISTRY
    text = registry.read_text()
    line = f'    "{name}": "engineforge.backends.{module}:{cls}",\n'
    registry.write_text(text.replace("}\n", line + "}\n", 1))


def _changed_files(copy) -> list[str]:
    """Files of the copy that differ from (or are missing in) the repository's workflow."""
    changed = []
    for path in sorted(copy.rglob("*")):
        rel = path.relative_to(copy)
        if path.is_dir() or "__pycache__" in rel.parts:
            continue
        original = ROOT / rel
        if not original.is_file() or not filecmp.cmp(original, path, shallow=False):
            changed.append(rel.as_posix())
    return changed


@pytest.fixture(scope="module")
def plugged(tmp_path_factory):
    copy = tmp_path_factory.mktemp("repo")
    _copy_workflow(copy)
    _plug_in(copy, "reference_backend.py", "onnx-ref", "ReferenceBackend")
    ws = tmp_path_factory.mktemp("ws")
    write_tiny_workspace(ws)
    raw = tiny_raw_config(precisions=("fp32", "fp16"), backends=("onnxruntime", "onnx-ref"))
    write_config(ws, raw)
    proc = snakemake(ws, snakefile=copy / "Snakefile")
    return copy, ws, proc


def test_a_backend_is_one_module_and_one_registry_line(plugged):
    copy, _, _ = plugged
    assert _changed_files(copy) == [REGISTRY, "workflow/engineforge/backends/reference_backend.py"]
    diff = [ln for ln in (copy / REGISTRY).read_text().splitlines()
            if ln not in (ROOT / REGISTRY).read_text().splitlines()]
    assert len(diff) == 1


def test_plugged_backend_builds_audits_and_benches_every_variant(plugged):
    _, ws, _ = plugged
    a = ws / "artifacts"
    for p in ("fp32", "fp16"):
        for prof in ("small", "large"):
            engine = a / f"tinyfcn/build/onnx-ref/{p}/{prof}/engine.ref.onnx"
            assert engine.stat().st_size > 0
            bench = json.loads((a / f"tinyfcn/bench/onnx-ref/{p}/{prof}.json").read_text())
            assert bench["result"]["status"] == "ok"
            assert bench["result"]["points"]["opt"]["p50_ms"] > 0
        audit = json.loads((a / f"tinycls/audit/onnx-ref/{p}.json").read_text())["result"]
        assert audit["status"] == "pass" and audit["outputs"]
    rows = json.loads((a / "tinycls/audit/drift.json").read_text())["rows"]
    assert [r["backend"] for r in rows].count("onnx-ref") == 2
    assert "| tinycls | fp16 | onnx-ref | pass |" in (a / "summary.md").read_text()


def test_plugged_backend_is_tracked(plugged):
    _, ws, _ = plugged
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("engineforge-tests")
    runs = client.search_runs([exp.experiment_id], "tags.`engineforge.backend` = 'onnx-ref'")
    assert len(runs) == 2 * 1 + 2 * 2  # tinycls: 2 precisions x 1 profile; tinyfcn: 2 x 2


def test_a_segfaulting_backend_fails_only_its_own_jobs(plugged, tmp_path):
    copy, _, _ = plugged
    # setup: a second plug-in whose build kills its process with SIGSEGV
    _plug_in(copy, "crashing_backend.py", "segv", "CrashingBackend")
    write_tiny_workspace(tmp_path)
    raw = tiny_raw_config(precisions=("fp32",), backends=("onnxruntime", "segv"))
    raw["models"] = {"tinyfcn": raw["models"]["tinyfcn"]}  # one model: two segv builds
    write_config(tmp_path, raw)
    # execute
    proc = snakemake(tmp_path, snakefile=copy / "Snakefile", check=False)
    # assert: the run went on and every onnxruntime result is there
    assert proc.returncode != 0
    a = tmp_path / "artifacts"
    for model, profiles in (("tinyfcn", ["small", "large"]),):
        assert (a / f"{model}/audit/onnxruntime/fp32.json").is_file()
        for prof in profiles:
            assert (a / f"{model}/bench/onnxruntime/fp32/{prof}.json").is_file()
            assert not (a / f"{model}/build/segv/fp32/{prof}/engine.segv").exists()
    failures = [json.loads(f.read_text()) for f in sorted((a / "_failures").glob("*.json"))]
    assert len(failures) == 2  # one per segv build: tinyfcn x 2 profiles
    assert {(f["stage"], f["backend"], f["profile"]) for f in failures} == {
        ("build", "segv", "small"), ("build", "segv", "large")}
    line = failures[0]["reason"]
    assert "signal 11 (SIGSEGV)" in line and "stage=build" in line and ".log" in line
    assert "signal 11 (SIGSEGV)" in proc.stderr and "Traceback" not in proc.stderr
