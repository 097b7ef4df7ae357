"""The GPU bench harness: its statistics on synthetic samples, its timing loop on the CPU
timer, and a clear error where CUDA is asked for and absent. No CUDA is mocked."""

from __future__ import annotations

import random
import statistics
import time

import pytest
import torch
from engineforge import gpubench
from engineforge.gpubench import GpuBenchError, Peak
from workflow_helpers import FakeClock


def test_percentile_matches_numpy_linear_interpolation():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    xs = [rng.lognormvariate(0, 0.5) for _ in range(101)] + [50.0]  # one outlier
    for q in (0, 1, 50, 90, 95, 99, 100):
        assert gpubench.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert gpubench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert gpubench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        gpubench.percentile([], 50)
    with pytest.raises(ValueError):
        gpubench.percentile([1.0], 101)


def test_cv_is_sample_stdev_over_mean():
    xs = [1.0, 1.1, 0.9, 1.05, 0.95]
    assert gpubench.cv(xs) == pytest.approx(statistics.stdev(xs) / statistics.mean(xs))
    assert gpubench.cv([2.0, 2.0, 2.0]) == 0.0
    assert gpubench.cv([5.0]) == 0.0


def test_summarize_orders_percentiles_and_rejects_non_finite():
    rng = random.Random(1)
    xs = [1.0 + rng.expovariate(20) for _ in range(1000)]  # a right tail, like real latency
    s = gpubench.summarize(xs)
    assert s["min_ms"] <= s["p50_ms"] < s["p90_ms"] < s["p95_ms"] < s["p99_ms"] <= s["max_ms"]
    assert s["p50_ms"] == pytest.approx(statistics.median(xs))
    assert s["mean_ms"] == pytest.approx(statistics.mean(xs)) and s["n"] == 1000
    for bad in ([], [1.0, float("nan")], [float("inf")]):
        with pytest.raises(ValueError):
            gpubench.summarize(bad)


def test_stability_rule_needs_a_full_quiet_window():
    quiet = [1.00, 1.01, 0.99, 1.00, 1.005]
    noisy = [1.0, 1.3, 0.8, 1.1, 0.9]
    assert gpubench.is_stable(quiet, 0.02, window=5)
    assert not gpubench.is_stable(noisy, 0.02, window=5)
    assert not gpubench.is_stable(quiet[:4], 0.02, window=5)  # too few rounds yet
    assert gpubench.is_stable(noisy + quiet, 0.02, window=5)  # only the last window counts


def test_cpu_timing_loop_times_each_call_and_stops_when_stable(monkeypatch):
    # setup: calls that cost 1.9-2.1 ms (median 2.0 in every round); warm-up calls cost 50
    clock = FakeClock()
    monkeypatch.setattr(gpubench, "time", clock)
    costs = iter([50.0, 50.0] + [1.9, 2.0, 2.1, 2.0, 2.0] * 20)
    # execute
    timing = gpubench.time_callable(lambda: clock.spend(next(costs)), device="cpu", warmup=2,
                                    iters_per_round=5, min_rounds=3, window=3,
                                    target_cv=0.5, max_rounds=20)
    # assert: every call timed on its own, the warm-up left out, stable at the first chance
    assert timing.timer == "perf_counter" and not timing.cuda_graph
    assert timing.samples_ms == pytest.approx([1.9, 2.0, 2.1, 2.0, 2.0] * 3)
    assert timing.stats["p50_ms"] == pytest.approx(2.0) and timing.stats["max_ms"] < 2.2
    assert timing.stable and timing.round_medians_ms == pytest.approx([2.0] * 3)
    assert len(timing.samples_ms) == 15 == timing.stats["n"] and timing.cv < 1e-9


def test_cpu_timing_loop_measures_real_time():
    """The real clock: a 2 ms sleep never returns early, so no sample is under 2 ms (a
    loaded machine may oversleep: the upper bound is loose); positive control: a call that
    does nothing times at well under 2 ms, so the 2 ms are the sleep's, not the loop's."""
    def timed(fn):
        return gpubench.time_callable(fn, device="cpu", warmup=1, iters_per_round=5,
                                      min_rounds=3, window=3, target_cv=10.0, max_rounds=3)

    slept = timed(lambda: time.sleep(0.002))
    idle = timed(lambda: None)
    assert slept.timer == "perf_counter" and len(slept.samples_ms) == 15
    assert min(slept.samples_ms) >= 2.0 and slept.stats["p50_ms"] < 1000.0
    assert 0 < idle.stats["p50_ms"] < 2.0


def test_cpu_timing_loop_stops_at_its_bounds_when_never_stable(monkeypatch):
    """Positive control for the stopping rule: alternating 6 ms / 1 ms rounds never reach a
    5 % CV, so the loop runs to max_rounds and says it is not stable."""
    clock = FakeClock()
    monkeypatch.setattr(gpubench, "time", clock)
    costs = iter([6.0] + ([6.0] * 4 + [1.0] * 4) * 10)  # one warm-up call, then rounds of 4

    timing = gpubench.time_callable(lambda: clock.spend(next(costs)), device="cpu", warmup=0,
                                    iters_per_round=4, min_rounds=3, window=3,
                                    target_cv=0.05, max_rounds=6)
    assert not timing.stable and timing.round_medians_ms == pytest.approx([6, 1] * 3)
    assert timing.cv == pytest.approx(statistics.stdev([1, 6, 1]) / statistics.mean([1, 6, 1]))


def test_report_row_throughput_tflops_peak_and_speedup():
    timing = gpubench.Timing(samples_ms=[2.0] * 10, round_medians_ms=[2.0] * 5, cv=0.0,
                             stable=True, timer="cuda-events", cuda_graph=True, warmup=1,
                             stats=gpubench.summarize([2.0] * 10))
    row = gpubench.report(timing, batch=32, flops=int(4e11),
                          peak=Peak("fp16", 800.0, "measured: test"), baseline_p50_ms=8.0)
    assert row["throughput_per_s"] == pytest.approx(16000.0)
    assert row["tflops"] == pytest.approx(200.0)
    assert row["pct_of_peak"] == pytest.approx(25.0) and row["peak_source"] == "measured: test"
    assert row["speedup"] == pytest.approx(4.0) and row["cuda_graph"] is True


def test_flop_counter_counts_a_linear_layer():
    lin = torch.nn.Linear(64, 32, bias=False)
    assert gpubench.count_flops(lin, (torch.randn(8, 64),)) == 2 * 8 * 64 * 32


def test_datasheet_peak_by_device_name():
    assert gpubench.datasheet_peak("NVIDIA H100 PCIe", "fp16").tflops == 756.5
    sxm = gpubench.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert sxm.tflops == 989.4 and "SXM" in sxm.source
    assert gpubench.datasheet_peak("NVIDIA GeForce RTX 4090", "fp16") is None


def test_eager_baselines_on_cpu_time_fp32_and_fp16_of_the_same_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    out = gpubench.eager_baselines(model, (torch.randn(1, 3, 16, 16),), device="cpu",
                                   dtypes=("fp32", "bf16"), warmup=1, iters_per_round=3,
                                   min_rounds=2, window=2, max_rounds=3)
    assert set(out) == {"fp32", "bf16"}
    assert all(t.stats["p50_ms"] > 0 for t in out.values())
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_timing_without_cuda_is_one_clear_error():
    with pytest.raises(GpuBenchError, match="no CUDA device") as err:
        gpubench.time_callable(lambda: None)
    assert "Fix:" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(GpuBenchError, match="CUDA graphs need"):
        gpubench.time_callable(lambda: None, device="cpu", cuda_graph=True)


def _point(p50: float) -> dict:
    return {"p50_ms": p50, "cv": 0.01}


def _failing_capture() -> dict:
    raise RuntimeError("operation not permitted when stream is capturing\nframe 1")


@pytest.mark.parametrize(("mode", "plain_ms", "graphed_ms", "reported_ms", "picked"), [
    ("auto", 2.0, 0.5, 0.5, True), ("auto", 0.5, 2.0, 0.5, False),
    ("on", 0.5, 2.0, 2.0, True), ("off", 2.0, 0.5, 2.0, False)])
def test_cuda_graph_setting_picks_the_reported_timing_and_keeps_the_other(
        mode, plain_ms, graphed_ms, reported_ms, picked):
    # setup: timings as a backend's bench point function returns them
    calls = []

    def graphed():
        calls.append("graphed")
        return _point(graphed_ms)

    # run
    point, facts = gpubench.with_cuda_graphs(mode, lambda: _point(plain_ms), graphed)
    # assert
    assert point["p50_ms"] == reported_ms and facts["cuda_graphs"] is picked
    if mode == "off":
        assert calls == [] and "with_cuda_graphs" not in facts
    else:
        other = facts["without_cuda_graphs" if picked else "with_cuda_graphs"]
        assert other["p50_ms"] == (plain_ms if picked else graphed_ms)


def test_a_failed_graph_is_a_finding_under_auto_and_one_line_under_on():
    # run
    point, facts = gpubench.with_cuda_graphs("auto", lambda: _point(1.0), _failing_capture)
    # assert: the plain timing stands, the cause is kept (first line only)
    assert point["p50_ms"] == 1.0 and facts["cuda_graphs"] is False
    assert facts["cuda_graphs_error"].startswith("RuntimeError: operation not permitted")
    assert "\n" not in facts["cuda_graphs_error"]
    with pytest.raises(gpubench.BenchError, match="CUDA graph capture failed") as err:
        gpubench.with_cuda_graphs("on", lambda: _point(1.0), _failing_capture)
    assert "\n" not in err.value.message
