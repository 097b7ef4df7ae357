"""Rebuild only when inputs change — the five scenarios, on the demo zoo.

The repository's config.yaml, models/ and calib/ are copied to a workspace
(bench iterations lowered to keep the test short) and built once; each
scenario then counts the jobs a dry run plans.
"""

from __future__ import annotations

import copy
import io
import json
import shutil

import numpy as np
import pytest
import yaml
from engineforge.layout import Layout
from workflow_helpers import ROOT, planned_jobs, planned_outputs, snakemake, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    ws = tmp_path_factory.mktemp("zoo")
    shutil.copytree(ROOT / "models", ws / "models", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "calib", ws / "calib")
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    # the three original demo models (the drift demos add localise/repair jobs: test_repair*)
    raw["models"] = {m: raw["models"][m] for m in ("digits_cnn", "resnet18", "tiny_sr")}
    raw["defaults"]["backends"] = ["onnxruntime", "tensorrt-rtx"]
    raw["defaults"]["bench"] = {"warmup": 1, "iterations": 2, "threads": 2}
    write_config(ws, raw)
    snakemake(ws)
    return ws, raw


def _edited(raw, change) -> dict:
    new = copy.deepcopy(raw)
    change(new)
    return new


def _planned_with_config(ws, raw, change) -> list[tuple[str, str]]:
    """The jobs a dry run plans with ``change`` applied to the config; the config is
    restored whatever happens."""
    try:
        write_config(ws, _edited(raw, change))
        return planned_outputs(ws)
    finally:
        write_config(ws, raw)


def _planned_with_file(path, new_bytes: bytes, ws) -> list[tuple[str, str]]:
    """The jobs a dry run plans with ``path`` holding ``new_bytes``; restored in any case."""
    original = path.read_bytes()
    try:
        path.write_bytes(new_bytes)
        return planned_outputs(ws)
    finally:
        path.write_bytes(original)


def test_touch_rebuilds_nothing(zoo):
    ws, raw = zoo
    # setup
    for f in [*ws.rglob("models/*"), *ws.rglob("calib/*"), ws / "config.yaml"]:
        f.touch()
    # execute: plain snakemake, no --workflow-profile (as a user types it)
    proc = snakemake(ws, "--dry-run")
    # assert: the profile was found next to the Snakefile, and nothing is planned
    assert "Using workflow specific profile" in proc.stdout + proc.stderr
    assert planned_jobs(ws) == {}
    # positive control: a real change to a touched file (config.yaml: digits_cnn's bench
    # settings) is seen, and plans exactly that model's benches and what reads them
    jobs = _planned_with_config(ws, raw, lambda r: r["models"]["digits_cnn"].update(
        bench={"iterations": 3}))
    layout, m = Layout("artifacts"), raw["models"]["digits_cnn"]
    expected = [("bench", layout.bench("digits_cnn", b, p, prof))
                for b in raw["defaults"]["backends"] for p in raw["defaults"]["precisions"]
                for prof in m["profiles"]]
    expected += [("bench_pytorch", layout.baseline("digits_cnn", prof))
                 for prof in m["profiles"]]
    expected += [("track", layout.track("digits_cnn")), ("summary", layout.summary("md")),
                 ("report_model", layout.report("drift_heatmap.png", "digits_cnn")),
                 ("report_html", layout.report_html()), ("all", "")]
    assert sorted(jobs) == sorted(expected) and len(jobs) == 4 * 2 + 1 + 5
    assert planned_jobs(ws) == {}  # restored


def test_editing_a_model_definition_reexports_only_that_model(zoo):
    ws, raw = zoo
    # setup: a comment is enough; the source is a declared input of the export
    arch = ws / "models/digits_cnn.py"
    # execute
    jobs = _planned_with_file(arch, arch.read_bytes() + b"\n# edited\n", ws)
    # assert
    assert [o for r, o in jobs if r == "export"] == ["artifacts/digits_cnn/export/model.onnx"]
    assert all("/digits_cnn/" in o for r, o in jobs
               if r not in ("summary", "report_html", "all"))


def test_one_precision_setting_reruns_only_that_branch(zoo):
    ws, raw = zoo
    # execute
    jobs = _planned_with_config(ws, raw, lambda r: r["models"]["resnet18"]["precision"][
        "int8"].update(calib_size=8))
    # assert
    rules = [r for r, _ in jobs]
    assert rules.count("precision") == 1 and "export" not in rules and "simplify" not in rules
    assert rules.count("build_tensorrt_rtx") == 1 and rules.count("build_onnxruntime") == 1
    assert rules.count("ort_quantize") == 1  # onnxruntime's int8 reads the same settings
    for rule, out in jobs:
        if rule in ("precision", "ort_quantize", "build_tensorrt_rtx", "build_onnxruntime",
                    "audit", "bench", "localise"):
            assert "/resnet18/" in out and "int8" in out, (rule, out)
        elif rule in ("drift_matrix", "track", "report_model"):
            assert "/resnet18/" in out
    assert rules.count("localise") == 1
    # precision, ort_quantize, 2 builds, 2 audits, 2 benches, localise, drift, report (model,
    # page), track, summary, all
    assert len(jobs) == 15


def test_new_calibration_data_reruns_only_quantized_variants_of_that_model(zoo):
    ws, raw = zoo
    # setup
    path = ws / "calib/digits_calib.npz"
    data = dict(np.load(path))
    data["image"] = data["image"][::-1].copy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    # execute
    jobs = _planned_with_file(path, buf.getvalue(), ws)
    # assert
    precision_jobs = [o for r, o in jobs if r == "precision"]
    assert precision_jobs == ["artifacts/digits_cnn/precision/int8/model.onnx"]
    assert all("/digits_cnn/" in o for r, o in jobs
               if r not in ("summary", "report_html", "all"))


def test_one_profile_change_reruns_only_its_builds_and_benches(zoo):
    ws, raw = zoo
    # execute: the second profile of tiny_sr gets a larger max
    jobs = _planned_with_config(ws, raw, lambda r: r["models"]["tiny_sr"]["profiles"][
        "large"]["lowres"].update(max=[2, 1, 512, 512]))
    # assert
    rules = {r for r, _ in jobs}
    assert rules == {"profile_check", "build_tensorrt_rtx", "build_onnxruntime", "bench",
                     "bench_pytorch", "report_model", "report_html", "track", "summary",
                     "all"}
    assert [o for r, o in jobs if r == "profile_check"] == [
        "artifacts/tiny_sr/export/profiles/large.json"]  # checked again; nothing re-exported
    assert all("/large" in o for r, o in jobs if r.startswith(("build", "bench")))
    assert len([r for r, _ in jobs if r.startswith("build")]) == 8  # 4 precisions x 2 backends


def test_tool_upgrade_reruns_the_stages_that_depend_on_it(zoo):
    ws, raw = zoo
    # execute: simulate an onnxsim upgrade, then a TensorRT-RTX upgrade
    onnxsim = planned_jobs(ws, env={"ENGINEFORGE_TOOL_VERSIONS": json.dumps({"onnxsim": "99"})})
    rtx = planned_jobs(ws, env={"ENGINEFORGE_TOOL_VERSIONS": json.dumps(
        {"tensorrt_rtx_cu13_bindings": "99"})})
    # assert
    assert "export" not in onnxsim and onnxsim["simplify"] == 3
    assert onnxsim["precision"] == 12
    assert set(rtx) >= {"build_tensorrt_rtx"} and "build_onnxruntime" not in rtx
    assert "precision" not in rtx and rtx["build_tensorrt_rtx"] == 16  # 4 + 4 + 8 engines
