"""Typed results end to end: the summary and the tracking record read the bench output of
every backend — onnxruntime (timed here), tensorrt-rtx (a 'not runnable' result on this
CPU-only machine) and trtexec (timed by its fake binary, tests/fixtures/trtexec/).

One tiny model goes through the real stages and runner into an artifacts tree laid out by
:class:`~engineforge.layout.Layout`; ``stages.summary.collect`` and
``stages.track.build_record`` then read it as the workflow's summary and track jobs do. The
trtexec binary is the only stand-in (a shell script on PATH: see
tests/backends/test_trtexec.py); the worker children see the PATH set here because the
runner hands every child the caller's current environment and directory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FIXTURES, run_stage, stage_job, tiny_raw_config, write_tiny_workspace
from engineforge import config
from engineforge.layout import Layout
from engineforge.results import BenchPoint, BenchResult
from engineforge.runner import run_job
from engineforge.sidecar import read_json
from engineforge.stages import summary, track

MODEL, PROFILE, PRECISION = "tinycls", "b1-8", "fp32"
BACKENDS = ("onnxruntime", "tensorrt-rtx", "trtexec")
TIMED = ("onnxruntime", "trtexec")  # engines that run here (trtexec: the fake binary)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(Layout, models): export, simplify, fp32 precision, the PyTorch baseline, and per
    backend its build and bench; audits of the runnable-or-refusing backends; the drift
    matrix. Outputs where the workflow puts them."""
    root = tmp_path_factory.mktemp("results")
    write_tiny_workspace(root)
    models = config.resolve(tiny_raw_config(precisions=(PRECISION,), backends=BACKENDS),
                            root)["models"]
    lay = Layout(str(root / "artifacts"))
    w = {"precision": PRECISION}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ENGINEFORGE_CACHE", "0")  # no MLflow build cache
        bindir = root / "bin"
        bindir.mkdir()
        shutil.copy(FIXTURES / "trtexec" / "fake_trtexec.sh", bindir / "trtexec")
        (bindir / "trtexec").chmod(0o755)
        mp.setenv("PATH", f"{bindir}:/usr/bin:/bin")
        mp.delenv("ENGINEFORGE_TRTEXEC", raising=False)
        for var in ("FAKE_TRT_VERSION", "FAKE_TRTEXEC_FAIL", "FAKE_TRTEXEC_NO_TIMES",
                    "FAKE_TRTEXEC_ARGV"):
            mp.delenv(var, raising=False)
        mp.setenv("FAKE_TRTEXEC_FIXTURES", str(FIXTURES / "trtexec"))
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))

        def stage(name, inputs, outputs, **wildcards):
            return run_stage(name, models, MODEL, inputs, outputs, root, **wildcards)

        stage("export", {"checkpoint": "tinycls.pt", "arch_source": "tinynets.py",
                         "evaluation": "eval.npz", "calibration": "calib.npz"},
              {"onnx": lay.export("model.onnx", MODEL),
               "reference": lay.export("reference.npz", MODEL),
               "sidecar": lay.export("export.json", MODEL)})
        stage("simplify", {"onnx": lay.export("model.onnx", MODEL)},
              {"onnx": lay.simplify("model.onnx", MODEL),
               "sidecar": lay.simplify("simplify.json", MODEL)})
        stage("precision", {"onnx": lay.simplify("model.onnx", MODEL)},
              {"onnx": lay.precision("model.onnx", MODEL, PRECISION),
               "sidecar": lay.precision("precision.json", MODEL, PRECISION)}, **w)
        stage("baseline", {"checkpoint": "tinycls.pt", "arch_source": "tinynets.py"},
              {"sidecar": lay.baseline(MODEL, PROFILE)}, profile=PROFILE)
        for backend in BACKENDS:
            engine = lay.engine(backend, MODEL, PRECISION, PROFILE)
            stage("build", {"onnx": lay.precision("model.onnx", MODEL, PRECISION)},
                  {"engine": engine, "sidecar": lay.build(backend, MODEL, PRECISION, PROFILE)},
                  backend=backend, precision=PRECISION, profile=PROFILE)
            stage("bench", {"engine": engine,
                            "build": lay.build(backend, MODEL, PRECISION, PROFILE)},
                  {"sidecar": lay.bench(MODEL, backend, PRECISION, PROFILE)},
                  backend=backend, precision=PRECISION, profile=PROFILE)
            # trtexec's engine (fake) has no runner here: its audit says "not runnable"
            stage("audit", {"engine": engine, "reference": lay.export("reference.npz", MODEL),
                            "evaluation": "eval.npz"},
                  {"sidecar": lay.audit(MODEL, backend, PRECISION)},
                  backend=backend, precision=PRECISION)
        job = replace(stage_job("drift", models, MODEL, {}, {"json": lay.drift("json", MODEL),
                                                             "md": lay.drift("md", MODEL)},
                                root),
                      extra_inputs=[Path(lay.audit(MODEL, b, PRECISION)) for b in BACKENDS])
        run_job(job)
    return lay, models


def _bench(lay: Layout, backend: str) -> BenchResult:
    return BenchResult.model_validate(
        read_json(lay.bench(MODEL, backend, PRECISION, PROFILE))["result"])


def _baseline_opt(lay: Layout) -> BenchPoint:
    return BenchResult.model_validate(read_json(lay.baseline(MODEL, PROFILE))["result"]
                                      ).points["opt"]


def test_every_backend_bench_is_the_same_typed_result(artifacts):
    # execute
    lay, _ = artifacts
    results = {b: _bench(lay, b) for b in BACKENDS}
    # assert: one shape of result; backend facts only under extra
    for b in TIMED:
        r = results[b]
        assert r.status == "ok" and r.backend == b and set(r.points) == {"min", "opt", "max"}
        assert r.points["opt"].shapes == {"x": [4, 3, 8, 8]} and r.points["opt"].batch == 4
        assert r.points["opt"].p50_ms > 0 and r.points["opt"].throughput_per_s > 0
    assert results["trtexec"].points["opt"].p50_ms == 0.875  # the fixture's median
    assert results["trtexec"].points["opt"].extra["source"] == "exportTimes"
    assert "providers" in results["onnxruntime"].points["opt"].extra
    rtx = results["tensorrt-rtx"]
    assert rtx.status == "not_runnable" and rtx.points == {}
    assert rtx.reason.startswith("not runnable on tensorrt-rtx:")


def test_summary_reads_every_backend(artifacts):
    # setup
    lay, _ = artifacts
    s = summary.Settings(models={MODEL: {"precisions": [PRECISION], "backends": list(BACKENDS),
                                         "profile": PROFILE}},
                         skipped_backends={"tensorrt": "tensorrt: skipped: not installed"})
    base = _baseline_opt(lay)
    # execute
    out = summary.collect(lay, s)
    md = summary.markdown(out)
    # assert
    rows = {r["backend"]: r for r in out["rows"]}
    assert list(rows) == list(BACKENDS)
    for b in TIMED:
        opt = _bench(lay, b).points["opt"]
        assert rows[b]["p50_ms"] == opt.p50_ms
        assert rows[b]["speedup"] == pytest.approx(base.p50_ms / opt.p50_ms)
    assert rows["trtexec"]["p50_ms"] == 0.875
    assert rows["trtexec"]["engine_mib"] == 26 / 2**20
    assert rows["trtexec"]["audit"].startswith("not runnable on trtexec:")
    assert rows["onnxruntime"]["audit"] == "pass" and rows["onnxruntime"]["accuracy"] > 0.9
    rtx = rows["tensorrt-rtx"]
    assert "p50_ms" not in rtx and "speedup" not in rtx
    assert rtx["bench"] == _bench(lay, "tensorrt-rtx").reason
    assert rtx["audit"].startswith("not runnable on tensorrt-rtx:")
    assert rtx["engine_mib"] > 0 and rtx["build_s"] > 0
    assert all(r["onnx_mib"] > 0 for r in rows.values())
    assert "| tinycls | fp32 | trtexec | n/a [" in md and "0.875" in md
    assert "compute capability" in md and "- tensorrt: skipped: not installed" in md


def test_tracking_record_reads_every_backend(artifacts):
    # setup
    lay, models = artifacts
    builds = {b: [PROFILE] for b in BACKENDS}
    s = track.settings(models[MODEL], {"model": MODEL}, "engineforge-tests", builds)
    sidecars = track.model_outputs(lay, MODEL, s)
    base = _baseline_opt(lay)
    # execute
    record = track.build_record(MODEL, s.model, s.experiment, sidecars)
    # assert
    children = {c["tags"]["engineforge.backend"]: c for c in record["children"]}
    assert set(children) == set(BACKENDS)
    for b in TIMED:
        c, opt = children[b], _bench(lay, b).points["opt"]
        assert c["name"] == f"{MODEL}/{PRECISION}/{PROFILE}/{b}"
        assert c["tags"]["engineforge.bench"] == "ok"
        assert c["metrics"]["latency.opt.p50_ms"] == opt.p50_ms
        assert c["metrics"]["latency.opt.throughput_per_s"] == opt.throughput_per_s
        assert c["metrics"]["latency.max.cv"] == _bench(lay, b).points["max"].cv
        assert c["metrics"]["speedup_vs_pytorch.opt"] == pytest.approx(
            base.p50_ms / opt.p50_ms)
        assert not any("extra" in k for k in c["metrics"])
    assert children["trtexec"]["metrics"]["latency.opt.p50_ms"] == 0.875
    assert children["trtexec"]["metrics"]["build.engine_bytes"] == 26.0
    assert children["trtexec"]["tags"]["engineforge.audit"] == "not_runnable"
    rtx = children["tensorrt-rtx"]
    assert rtx["tags"]["engineforge.bench"] == "not_runnable"
    assert rtx["tags"]["engineforge.audit"] == "not_runnable"
    assert not any(k.startswith(("latency.", "speedup")) for k in rtx["metrics"])
    assert rtx["metrics"]["build.engine_bytes"] > 0
    assert children["onnxruntime"]["tags"]["engineforge.audit"] == "pass"
    bench_files = [a for c in record["children"] for a in c["artifacts"] if a[1] == "bench"]
    assert len(bench_files) == 3 and len(record["id"]) == 32


def test_summary_says_why_an_audit_failed(artifacts, tmp_path):
    """A failed verdict carries its reason (e.g. NaN outputs) into the summary as a note."""
    # setup: a copy of the tree whose onnxruntime audit failed on non-finite outputs
    lay, _ = artifacts
    root = Path(lay.root)
    copy = tmp_path / "artifacts"
    shutil.copytree(root, copy)
    audit = Path(Layout(str(copy)).audit(MODEL, "onnxruntime", PRECISION))
    side = read_json(audit)
    reason = "variant output 'y' is not finite: 3 NaN and 0 Inf of 20 values"
    side["result"] |= {"status": "fail", "reason": reason, "failures": [reason]}
    audit.write_text(json.dumps(side))
    s = summary.Settings(models={MODEL: {"precisions": [PRECISION], "backends": ["onnxruntime"],
                                         "profile": PROFILE}}, skipped_backends={})
    # execute
    md = summary.markdown(summary.collect(Layout(str(copy)), s))
    # assert
    assert "| tinycls | fp32 | onnxruntime | fail [1] |" in md
    assert f"1. {reason}" in md
    # control: the tree as built says pass, with no note
    assert "| onnxruntime | pass |" in summary.markdown(summary.collect(lay, s))


def test_a_variant_slower_than_fp32_on_its_backend_is_noted():
    """ORT's int8 loses to fp32 on CPU for some models (googlenet, squeezenet, shufflenet):
    the summary says so beside the figure, once, unless the backend explained it already."""
    # setup: rows as collect() makes them
    rows = [{"model": "m", "precision": "fp32", "backend": "onnxruntime", "p50_ms": 2.0},
            {"model": "m", "precision": "int8", "backend": "onnxruntime", "p50_ms": 3.0,
             "speedup": 0.5},
            {"model": "m", "precision": "fp16", "backend": "onnxruntime", "p50_ms": 4.0,
             "speedup_note": "ORT CPU has no fast fp16 kernels"},
            {"model": "m", "precision": "bf16", "backend": "onnxruntime", "p50_ms": 2.1},
            {"model": "m", "precision": "int8", "backend": "tensorrt-rtx", "p50_ms": 9.0},
            {"model": "n", "precision": "int8", "backend": "onnxruntime", "p50_ms": 1.0}]
    # run
    summary._note_slower_than_fp32(rows)
    md = summary.markdown({"rows": rows, "skipped_backends": {}})
    # assert: only the int8 row 1.5x slower than its own backend's fp32 is noted
    noted = [(r["precision"], r["backend"]) for r in rows
             if r.get("speedup_note") == summary.SLOWER_NOTE]
    assert noted == [("int8", "onnxruntime")]
    assert rows[2]["speedup_note"] == "ORT CPU has no fast fp16 kernels"  # kept
    assert "| 0.50 [1] |" in md and f"1. {summary.SLOWER_NOTE}" in md
