"""Bench stage: latency statistics, the PyTorch baseline, and 'not runnable' as a result.

Stages run through the real runner (``conftest.run_stage``); their sidecar's ``result`` is a
:class:`~engineforge.results.BenchResult` whose points carry the same
:class:`~engineforge.results.BenchPoint` fields for every backend.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_stage, stage_job
from engineforge.errors import BenchError
from engineforge.results import BenchPoint, BenchResult
from engineforge.runner import StageFailed
from engineforge.stages import baseline, bench
from workflow_helpers import FakeClock


@pytest.fixture(autouse=True)
def _no_mlflow_cache(monkeypatch):
    """Stage tests never consult (or create) an MLflow cache."""
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")


def _bench(models: dict, tmp: Path, backend: str, profile: str, engine: Path, build: Path,
           model: str = "tinyfcn") -> dict:
    """The bench stage with the bench rule's inputs; returns its sidecar."""
    return run_stage("bench", models, model, {"engine": engine, "build": build},
                     {"sidecar": tmp / "bench" / f"{backend}-{profile}.json"}, tmp,
                     backend=backend, precision="fp32", profile=profile)


def _stub_build(tmp: Path) -> tuple[Path, Path]:
    """An engine file and a build sidecar the bench only hashes (it never reads them)."""
    (tmp / "b").mkdir(exist_ok=True)
    (tmp / "b/engine.plan").write_bytes(b"x")
    (tmp / "b/build.json").write_text('{"result": {"engine_bytes": 1}}')
    return tmp / "b/engine.plan", tmp / "b/build.json"


def test_time_callable_statistics(monkeypatch):
    # setup: a callable whose cost is known: 2 warm-ups of 50 ms (not timed), 9 calls of
    # 2 ms and one of 20 ms
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    costs = iter([50.0] * 2 + [2.0] * 9 + [20.0])
    # execute
    stats = bench.time_callable(lambda: clock.spend(next(costs)), warmup=2, iterations=10,
                                batch=4)
    # assert: numpy's linear percentiles of [2]*9 + [20]; the warm-ups left out
    ms = np.array([2.0] * 9 + [20.0])
    assert stats["p50_ms"] == pytest.approx(2.0) and stats["min_ms"] == pytest.approx(2.0)
    assert stats["p90_ms"] == pytest.approx(3.8) and stats["p95_ms"] == pytest.approx(11.9)
    assert stats["p99_ms"] == pytest.approx(18.38) and stats["mean_ms"] == pytest.approx(3.8)
    assert stats["cv"] == pytest.approx(ms.std() / ms.mean()) and stats["cv"] > 1.4
    assert stats["throughput_per_s"] == pytest.approx(4e3 / 3.8)
    assert (stats["iterations"], stats["warmup"], stats["batch"]) == (10, 2, 4)
    point = BenchPoint(shapes={"x": [4, 3]}, **stats)  # exactly the BenchPoint fields
    assert point.extra == {}


def test_time_callable_measures_real_time():
    """The real clock (perf_counter): a sleep never returns early, so every bound below is
    a floor the measurement must reach; a loaded machine may only oversleep (the one upper
    bound is loose). The exact statistics: test_time_callable_statistics."""
    delays = iter([0.0] * 2 + [0.002] * 9 + [0.02])
    stats = bench.time_callable(lambda: time.sleep(next(delays)), warmup=2, iterations=10)
    assert stats["min_ms"] >= 2.0 and stats["mean_ms"] >= (9 * 2.0 + 20.0) / 10
    assert stats["p99_ms"] >= 0.09 * 2.0 + 0.91 * 20.0 - 1e-9  # the 20 ms call is timed
    assert stats["p50_ms"] < 1000.0


def test_bench_ort_and_pytorch_baseline_at_each_profile_point(tiny_models, tiny_workspace):
    # setup
    tmp = tiny_workspace
    run_stage("export", tiny_models, "tinyfcn",
              {"arch_source": "tinynets.py", "calibration": "calib_fcn.npz"},
              {"onnx": tmp / "e/model.onnx", "reference": tmp / "e/reference.npz",
               "sidecar": tmp / "e/export.json"}, tmp)
    run_stage("build", tiny_models, "tinyfcn", {"onnx": tmp / "e/model.onnx"},
              {"engine": tmp / "b/engine.onnx", "sidecar": tmp / "b/build.json"}, tmp,
              backend="onnxruntime", precision="fp32", profile="large")
    # execute
    side = _bench(tiny_models, tmp, "onnxruntime", "large", tmp / "b/engine.onnx",
                  tmp / "b/build.json")
    base = run_stage("baseline", tiny_models, "tinyfcn", {"arch_source": "tinynets.py"},
                     {"sidecar": tmp / "base.json"}, tmp, profile="large")
    # assert
    r = side["result"]
    typed = BenchResult.model_validate(r)
    assert r["status"] == "ok" and r["reason"] is None
    assert (typed.backend, typed.precision, typed.profile) == ("onnxruntime", "fp32", "large")
    assert [r["points"][w]["shapes"]["img"] for w in ("min", "opt", "max")] == [
        [1, 1, 32, 32], [1, 1, 48, 48], [1, 1, 64, 64]]
    assert r["points"]["max"]["iterations"] == 3 and r["threads"] == 1
    for p in typed.points.values():
        assert p.batch == 1 and p.warmup == 1
        assert p.min_ms <= p.p50_ms <= p.p90_ms <= p.p95_ms <= p.p99_ms
        assert p.throughput_per_s == pytest.approx(1e3 / p.mean_ms)
        assert "CPUExecutionProvider" in p.extra["providers"]
        assert p.extra["device"] == "cpu"  # the summary compares with the CPU baseline
    assert typed.device["cores"] >= 1 and typed.device["device"].startswith("cpu:")
    assert set(side["inputs"]) == {"engine", "build"}
    assert side["config"]["shapes"] == tiny_models["tinyfcn"]["profiles"]["large"]
    b = BenchResult.model_validate(base["result"])
    assert b.status == "ok" and b.backend == "pytorch" and b.precision is None
    assert set(b.points) == {"min", "opt", "max"} and b.threads == 1
    assert b.points["opt"].shapes == {"img": [1, 1, 48, 48]}
    assert base["config"]["profile"] == "large"


def test_engine_that_cannot_run_here_is_a_result(tiny_models, tiny_workspace):
    # setup: a TensorRT-RTX engine cannot execute on a CPU-only machine
    engine, build = _stub_build(tiny_workspace)
    # execute
    side = _bench(tiny_models, tiny_workspace, "tensorrt-rtx", "small", engine, build)
    # assert
    r = BenchResult.model_validate(side["result"])
    assert r.status == "not_runnable" and r.points == {}
    assert r.reason.startswith("not runnable on tensorrt-rtx:")
    assert "compute capability" in r.reason
    assert side["config"]["backend_settings"] == tiny_models["tinyfcn"]["tensorrt"]


def test_engine_the_runtime_rejects_is_a_result(tiny_models, tiny_workspace):
    # setup: a file ONNX Runtime cannot load
    engine, build = _stub_build(tiny_workspace)
    # execute
    side = _bench(tiny_models, tiny_workspace, "onnxruntime", "small", engine, build)
    # assert: the backend's BenchError became the result, with no partial points
    r = BenchResult.model_validate(side["result"])
    assert r.status == "not_runnable" and r.points == {}
    assert r.reason.startswith("not runnable on onnxruntime: ")


def test_baseline_without_a_pytorch_checkpoint_is_a_result(tiny_models, tiny_workspace):
    # setup: an ONNX checkpoint has no eager model to time
    models = copy.deepcopy(tiny_models)
    models["tinyfcn"]["checkpoint"] = {"kind": "onnx", "path": "model.onnx"}
    # execute
    side = run_stage("baseline", models, "tinyfcn", {}, {"sidecar": tiny_workspace / "b.json"},
                     tiny_workspace, profile="small")
    # assert
    r = BenchResult.model_validate(side["result"])
    assert r.status == "not_runnable" and r.backend == "pytorch" and r.points == {}
    assert r.reason == "no PyTorch checkpoint (onnx input)"


def test_baseline_failure_is_a_bench_error(tiny_models, tiny_workspace):
    # setup: profile shapes the network cannot take (4 channels into a 3-channel conv)
    models = copy.deepcopy(tiny_models)
    m = models["tinycls"]
    m["inputs"]["x"]["shape"] = ["batch", 4, 8, 8]
    m["profiles"]["b1-8"] = {"x": {k: [b, 4, 8, 8] for k, b in
                                   (("min", 1), ("opt", 4), ("max", 8))}}
    inputs = {"checkpoint": "tinycls.pt", "arch_source": "tinynets.py"}
    outputs = {"sidecar": tiny_workspace / "base.json"}
    # execute: the body itself raises the typed error ...
    job = stage_job("baseline", models, "tinycls", inputs, outputs, tiny_workspace,
                    profile="b1-8")
    with pytest.raises(BenchError) as direct:
        baseline.run(job)
    # ... which the runner turns into one line, leaving no sidecar
    with pytest.raises(StageFailed) as failed:
        run_stage("baseline", models, "tinycls", inputs, outputs, tiny_workspace,
                  profile="b1-8")
    # assert
    assert direct.value.key == "models.tinycls.profiles.b1-8"
    assert "eager PyTorch failed at min shapes" in direct.value.message
    text = str(failed.value)
    assert text.startswith("[model=tinycls stage=bench key=models.tinycls.profiles.b1-8] "
                           "eager PyTorch failed at min shapes {'x': [1, 4, 8, 8]}")
    assert "\n" not in text and not outputs["sidecar"].exists()


@pytest.mark.parametrize(("backend", "section", "key", "value", "rebuilds"), [
    ("onnxruntime", "onnxruntime", "cuda_graphs", "off", False),
    ("torch-inductor", "torch_inductor", "cuda_graphs", "off", False),
    ("tensorrt-rtx", "tensorrt", "use_cuda_graph", True, False),
    ("trtexec", "tensorrt", "avg_runs", 3, False),
    # controls: keys that do change the engine
    ("torch-inductor", "torch_inductor", "cudnn_fusion", False, True),
    ("tensorrt-rtx", "tensorrt", "builder_optimization_level", 5, True)])
def test_a_bench_only_setting_changes_the_bench_not_the_build(tiny_models, backend, section,
                                                              key, value, rebuilds):
    """Changing how an engine is timed re-runs its bench, never its build."""
    from engineforge.stages import build

    # setup: the same model with one backend key changed
    m = tiny_models["tinyfcn"]
    changed = copy.deepcopy(m)
    assert changed[section][key] != value
    changed[section][key] = value
    w = {"model": "tinyfcn", "backend": backend, "precision": "fp16", "profile": "large"}
    # run / assert
    assert (build.settings(changed, w) != build.settings(m, w)) is rebuilds
    assert bench.settings(changed, w) != bench.settings(m, w)
