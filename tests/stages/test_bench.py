"""Bench stage: latency statistics, the PyTorch baseline, and 'not runnable' as a result."""

from __future__ import annotations

import time

import numpy as np
from engineforge.backends import BuildRequest, get_backend
from engineforge.sidecar import write_json
from engineforge.stages import bench, export


def test_time_callable_statistics():
    # setup: a callable whose cost is known
    delays = iter([0.0] * 2 + [0.002] * 9 + [0.02])
    # execute
    stats = bench.time_callable(lambda: time.sleep(next(delays)), warmup=2, iterations=10,
                                batch=4)
    # assert
    assert 1.5 < stats["p50_ms"] < 10 and stats["p99_ms"] > 15
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
    assert stats["cv"] > 0.5
    assert np.isclose(stats["throughput_per_s"], 4e3 / stats["mean_ms"])


def test_bench_ort_and_pytorch_baseline_at_each_profile_point(tiny_models, tiny_workspace):
    # setup
    m, tmp = tiny_models["tinyfcn"], tiny_workspace
    export.run("tinyfcn", m, tmp / "e/model.onnx", tmp / "e/ref.npz", tmp / "e/export.json",
               root=tmp)
    result = get_backend("onnxruntime").build(BuildRequest(
        model="tinyfcn", precision="fp32", onnx_path=tmp / "e/model.onnx",
        engine_path=tmp / "b/engine.onnx", work_dir=tmp, profiles=[]))
    write_json(tmp / "b/build.json", {"result": result})
    # execute
    side = bench.run("tinyfcn", m, "onnxruntime", "fp32", "large", tmp / "b/engine.onnx",
                     tmp / "b/build.json", tmp / "bench.json", tmp)
    base = bench.run_baseline("tinyfcn", m, "large", tmp / "base.json", root=tmp)
    # assert
    r = side["result"]
    assert r["status"] == "ok"
    assert [r["points"][w]["shapes"]["img"] for w in ("min", "opt", "max")] == [
        [1, 1, 32, 32], [1, 1, 48, 48], [1, 1, 64, 64]]
    assert r["points"]["max"]["iterations"] == 3 and r["threads"] == 1
    assert base["result"]["status"] == "ok" and base["result"]["backend"] == "pytorch"
    assert set(base["result"]["points"]) == {"min", "opt", "max"}


def test_engine_that_cannot_run_here_is_a_result(tiny_models, tiny_workspace):
    # setup: a TensorRT-RTX engine cannot execute on a CPU-only machine
    m, tmp = tiny_models["tinyfcn"], tiny_workspace
    (tmp / "engine.plan").write_bytes(b"x")
    write_json(tmp / "build.json", {"result": {"engine_bytes": 1}})
    # execute
    side = bench.run("tinyfcn", m, "tensorrt-rtx", "fp32", "small", tmp / "engine.plan",
                     tmp / "build.json", tmp / "bench.json", tmp)
    # assert
    assert side["result"]["status"] == "not_runnable"
    assert "compute capability" in side["result"]["reason"]
