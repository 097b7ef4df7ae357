"""trtexec backend: command lines, version parsing, output parsers, and the subprocess flow.

The real trtexec cannot exist on this machine (it ships with a full TensorRT install and
needs a GPU), so the subprocess tests put a fake ``trtexec`` shell script on PATH: a true
process boundary that prints a TensorRT 10 banner and writes the files trtexec writes.
That binary is the only stand-in here; everything else (the version-probe cache under
$XDG_CACHE_HOME, the build and bench stages, the runner, the typed results) is real.

Formats the fixtures follow (numbers written by hand, not copied from a run):
- exportTimes / exportProfile JSON: ``exportJSONTrace`` and ``Profiler::exportJSONProfile``
  in samples/common/sampleReporting.cpp of github.com/NVIDIA/TensorRT (v10.8 .. v11.1).
- "=== Performance summary ===": ``printEpilog`` in the same file, and the metric
  definitions on https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/
  command-line-programs.html ("Benchmarking Network").
- exportLayerInfo JSON (detailed verbosity): trex's parser
  (tools/experimental/trt-engine-explorer/trex/parser.py, layer.py) and its example plans.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_stage
from engineforge.backends import backend_class
from engineforge.backends.base import BuildRequest, gpu_device
from engineforge.backends.trtexec import (
    TrtexecBackend,
    bench_command,
    build_command,
    parse_export_profile,
    parse_export_times,
    parse_layer_info,
    parse_performance_summary,
    parse_version,
    probe_version,
    timing_cache_name,
)
from engineforge.errors import BackendUnavailable, BenchError, BuildError
from engineforge.layout import Layout
from engineforge.results import BenchPoint, BenchResult, BuildResult

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "trtexec"
TRT10, TRT11 = (10, 8, 0), (11, 0, 0)
SETTINGS = {"precision_mode": "graph", "workspace_mib": 2048, "builder_optimization_level": 3,
            "multi_profile_engine": False, "use_cuda_graph": False,
            "no_data_transfers": False, "trtexec": "trtexec"}
PROFILE = {"input": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}}


def request(precision="fp16", mode="graph", profiles=None, calib=None, tmp=Path("/w"),
            **settings):
    return BuildRequest(
        model="resnet18", precision=precision, onnx_path=tmp / f"resnet18.{precision}.onnx",
        engine_path=tmp / "engines" / f"resnet18.{precision}.engine", work_dir=tmp / "work",
        profiles=profiles or [PROFILE], settings={**SETTINGS, "precision_mode": mode, **settings},
        calib_cache=calib, timing_cache=Path("/c/timing.cache"))


def build_tail(precision_flags: list[str]) -> list[str]:
    return ["trtexec", "--onnx=/w/resnet18.fp16.onnx",
            "--saveEngine=/w/engines/resnet18.fp16.engine",
            "--minShapes=input:1x3x224x224", "--optShapes=input:8x3x224x224",
            "--maxShapes=input:32x3x224x224", *precision_flags,
            "--timingCacheFile=/c/timing.cache", "--memPoolSize=workspace:2048M",
            "--builderOptimizationLevel=3", "--profilingVerbosity=detailed",
            "--exportLayerInfo=/w/work/layers.json", "--skipInference"]


# --------------------------------------------------------------------- build command
CALIB = Path("/calib/resnet18.int8.cache")
# (TensorRT major, precision_mode, precision) -> precision flags; None = BuildError.
EXPECTED_FLAGS = {
    (10, "graph", "fp32"): ["--stronglyTyped"], (10, "graph", "fp16"): ["--stronglyTyped"],
    (10, "graph", "bf16"): ["--stronglyTyped"], (10, "graph", "int8"): ["--stronglyTyped"],
    (10, "graph", "fp8"): ["--stronglyTyped"],
    (10, "flags", "fp32"): [], (10, "flags", "fp16"): ["--fp16"],
    (10, "flags", "bf16"): ["--bf16"], (10, "flags", "int8"): ["--int8", f"--calib={CALIB}"],
    (10, "flags", "fp8"): ["--fp8"],
    (11, "graph", "fp32"): [], (11, "graph", "fp16"): [], (11, "graph", "bf16"): [],
    (11, "graph", "int8"): [], (11, "graph", "fp8"): [],
    (11, "flags", "fp32"): None, (11, "flags", "fp16"): None, (11, "flags", "bf16"): None,
    (11, "flags", "int8"): None, (11, "flags", "fp8"): None,
}


@pytest.mark.parametrize("major,mode,precision", sorted(EXPECTED_FLAGS))
def test_build_command_precision_matrix(major, mode, precision):
    version = TRT10 if major == 10 else TRT11
    req = request(precision, mode, calib=CALIB)
    expected = EXPECTED_FLAGS[(major, mode, precision)]
    if expected is None:
        with pytest.raises(BuildError) as err:
            build_command(req, version)
        msg = str(err.value)
        assert "removed the builder precision flags" in msg and "precision_mode: graph" in msg
        assert "model=resnet18" in msg and precision in msg and "tensorrt.precision_mode" in msg
        return
    cmd = build_command(req, version)
    tail = build_tail(expected)
    tail[1] = f"--onnx=/w/resnet18.{precision}.onnx"
    tail[2] = f"--saveEngine=/w/engines/resnet18.{precision}.engine"
    assert cmd == tail
    if major == 11:  # TensorRT 11: no precision flag of any kind reaches trtexec
        banned = {"--fp16", "--bf16", "--int8", "--fp8", "--best", "--stronglyTyped"}
        assert not banned & set(cmd) and not any(a.startswith("--calib") for a in cmd)


def test_build_command_exact_trt10_graph():
    assert build_command(request(), TRT10, trtexec="/opt/tensorrt/bin/trtexec") == [
        "/opt/tensorrt/bin/trtexec", "--onnx=/w/resnet18.fp16.onnx",
        "--saveEngine=/w/engines/resnet18.fp16.engine",
        "--minShapes=input:1x3x224x224", "--optShapes=input:8x3x224x224",
        "--maxShapes=input:32x3x224x224", "--stronglyTyped",
        "--timingCacheFile=/c/timing.cache", "--memPoolSize=workspace:2048M",
        "--builderOptimizationLevel=3", "--profilingVerbosity=detailed",
        "--exportLayerInfo=/w/work/layers.json", "--skipInference"]


def test_build_command_multi_profile_uses_profile_index_before_each_triple():
    """trtexec rejects repeated --minShapes without --profile=N (sampleOptions.cpp:
    "Multiple --minShapes/--optShapes/--maxShapes without --profile are not allowed")."""
    p0 = {"input": {"min": [1, 3, 224, 224], "opt": [1, 3, 224, 224], "max": [4, 3, 224, 224]},
          "mask": {"min": [1, 224, 224], "opt": [1, 224, 224], "max": [4, 224, 224]}}
    p1 = {"input": {"min": [8, 3, 224, 224], "opt": [16, 3, 224, 224], "max": [32, 3, 224, 224]},
          "mask": {"min": [8, 224, 224], "opt": [16, 224, 224], "max": [32, 224, 224]}}
    cmd = build_command(request(profiles=[p0, p1], multi_profile_engine=True), TRT11)
    assert cmd[3:11] == [
        "--profile=0", "--minShapes=input:1x3x224x224,mask:1x224x224",
        "--optShapes=input:1x3x224x224,mask:1x224x224",
        "--maxShapes=input:4x3x224x224,mask:4x224x224",
        "--profile=1", "--minShapes=input:8x3x224x224,mask:8x224x224",
        "--optShapes=input:16x3x224x224,mask:16x224x224",
        "--maxShapes=input:32x3x224x224,mask:32x224x224"]
    assert cmd[11] == "--timingCacheFile=/c/timing.cache"


def test_build_command_settings_names_and_scalars():
    prof = {"input:0": {"min": [1, 4], "opt": [2, 4], "max": [3, 4]},
            "scale": {"min": [], "opt": [], "max": []}}
    req = request(profiles=[prof], workspace_mib=512, builder_optimization_level=5)
    req.timing_cache = None
    cmd = build_command(req, TRT10, save_engine=Path("/w/engines/.tmp"))
    assert cmd[2] == "--saveEngine=/w/engines/.tmp"
    assert cmd[3] == "--minShapes='input:0':1x4,scale:scalar"
    assert "--memPoolSize=workspace:512M" in cmd and "--builderOptimizationLevel=5" in cmd
    assert not any(a.startswith("--timingCacheFile") for a in cmd)


def test_build_command_int8_flags_without_calib_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="engineforge.backends.trtexec"):
        cmd = build_command(request("int8", "flags"), TRT10)
    assert "--int8" in cmd and not any(a.startswith("--calib") for a in cmd)
    assert "dummy scales" in caplog.text


@pytest.mark.parametrize("kw,key", [({"precision": "int4"}, "precisions"),
                                    ({"mode": "legacy"}, "tensorrt.precision_mode")])
def test_build_command_rejects_unknown_values(kw, key):
    with pytest.raises(BuildError, match=key):
        build_command(request(**kw), TRT10)


# --------------------------------------------------------------------- bench command
BENCH_HEAD = ["trtexec", "--loadEngine=/e/m.engine", "--shapes=input:8x3x224x224",
              "--warmUp=200", "--iterations=10", "--duration=3", "--avgRuns=10",
              "--percentile=90,95,99", "--exportTimes=/w/times.json",
              "--exportProfile=/w/profile.json"]


@pytest.mark.parametrize("version,graph,no_transfers,extra", [
    (TRT10, False, False, ["--separateProfileRun"]),
    (TRT10, True, True, ["--separateProfileRun", "--useCudaGraph", "--noDataTransfers"]),
    # TensorRT 11 defaults are graph on / transfers off / spin-wait on: turned back explicitly
    (TRT11, False, False, ["--noCudaGraph", "--includeDataTransfers", "--noSpinWait"]),
    (TRT11, True, True, ["--noSpinWait"]),
])
def test_bench_command_pins_settings_per_version(version, graph, no_transfers, extra):
    settings = {**SETTINGS, "use_cuda_graph": graph, "no_data_transfers": no_transfers}
    cmd = bench_command("/e/m.engine", {"input": [8, 3, 224, 224]}, settings, "/w", version)
    assert cmd == BENCH_HEAD + extra


def test_bench_command_custom_run_lengths_and_profile_index():
    settings = {"warmup_ms": 500, "iterations": 100, "duration_s": 0, "avg_runs": 5,
                "profile_index": 1, "use_spin_wait": True}
    cmd = bench_command(Path("/e/m.engine"), {"a": [1, 2], "b": [3]}, settings, Path("/w"),
                        TRT10, trtexec="/bin/trtexec")
    assert cmd[:8] == ["/bin/trtexec", "--loadEngine=/e/m.engine", "--shapes=a:1x2,b:3",
                       "--useProfile=1", "--warmUp=500", "--iterations=100", "--duration=0",
                       "--avgRuns=5"]
    assert cmd[-2:] == ["--separateProfileRun", "--useSpinWait"]


# --------------------------------------------------------------------- versions, names
@pytest.mark.parametrize("text,expected", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100800] [b43] # trtexec --help", (10, 8, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110000] [b32] # trtexec", (11, 0, 0)),
    ("&&&& PASSED TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --onnx=m.onnx",
     (11, 1, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v101601] [b7] # /usr/src/tensorrt/bin/trtexec",
     (10, 16, 1)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec --help", (8, 6, 1)),
    ("[06/12/2026-14:03:27] [I] TensorRT version: 10.3.0", (10, 3, 0)),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_version_rejects_text_without_version():
    with pytest.raises(ValueError):
        parse_version("usage: trtexec [options]")


@pytest.mark.parametrize("gpu,cc,trt,expected", [
    ("NVIDIA H100 80GB HBM3", (9, 0), (10, 8, 0),
     "timing-NVIDIA_H100_80GB_HBM3-sm90-trt10.8.0.cache"),
    ("NVIDIA A100-SXM4-80GB", "8.0", "11.0.0",
     "timing-NVIDIA_A100_SXM4_80GB-sm80-trt11.0.0.cache"),
    ("GeForce RTX 4090/../x", "sm89", (10, 16, 1),
     "timing-GeForce_RTX_4090_x-sm89-trt10.16.1.cache"),
])
def test_timing_cache_name(gpu, cc, trt, expected):
    assert timing_cache_name(gpu, cc, trt) == expected


# --------------------------------------------------------------------- parsers
def _records():
    return json.loads((FIX / "times.json").read_text())


# Hand-computed from fixtures/trtexec/times.json (12 records). Sorted latencyMs:
# .866 .867 .869 .870 .870 .874 .876 .876 .885 .914 1.004 1.277; percentiles interpolate
# linearly at rank q/100 * 11: p50 = (.874+.876)/2, p90 = .914 + .9*(1.004-.914),
# p95 = 1.004 + .45*(1.277-1.004), p99 = 1.004 + .89*(1.277-1.004). Sorted computeMs:
# .797 .798 .799 .800 .801 .803 .805 .807 .812 .845 .931 1.204, the same ranks.
FIXTURE_LATENCY = {50: 0.875, 90: 0.995, 95: 1.12685, 99: 1.24697}
FIXTURE_COMPUTE = {50: 0.804, 90: 0.9224, 95: 1.05385, 99: 1.17397}


def test_parse_export_times_matches_hand_computed_stats():
    # execute
    got = parse_export_times(FIX / "times.json")
    # assert
    assert got["count"] == 12
    for q in (50, 90, 95, 99):
        assert got[f"latency_ms_p{q}"] == pytest.approx(FIXTURE_LATENCY[q], abs=1e-9)
        assert got[f"gpu_compute_ms_p{q}"] == pytest.approx(FIXTURE_COMPUTE[q], abs=1e-9)
    assert got["latency_ms_mean"] == pytest.approx(11.048 / 12)  # the latencies sum to 11.048
    assert got["latency_ms_min"] == 0.866 and got["latency_ms_max"] == 1.277
    # population std (as trtexec) 0.113679 ms over the mean 0.920667 ms
    assert got["latency_ms_cv_pct"] == pytest.approx(100 * 0.113679 / 0.920667, abs=1e-4)
    # by hand: compute times sum to 10.202 ms; walltime 216.092 - 205 = 11.092 ms
    assert got["gpu_compute_ms_mean"] == pytest.approx(10.202 / 12)
    assert got["walltime_ms"] == pytest.approx(11.092)
    assert got["throughput_qps"] == pytest.approx(12 / 11.092 * 1000)
    assert got["h2d_ms_mean"] == pytest.approx(0.05) and got["d2h_ms_mean"] == pytest.approx(0.0205)
    assert got["enqueue_ms_mean"] == pytest.approx(0.155 / 12)


def test_parse_export_times_small_fixed_records():
    """Five records with round numbers: every figure can be checked by eye."""
    # setup: latency 1, 2, 3, 4, 10 ms; h2d 0.5, d2h 0.5, compute = latency - 1; 1 ms apart
    recs = []
    for i, lat in enumerate([3.0, 1.0, 10.0, 2.0, 4.0]):
        t = 100.0 + 20 * i
        recs.append({"startEnqMs": t - 0.25, "endEnqMs": t, "startH2dMs": t, "endH2dMs": t + 0.5,
                     "startComputeMs": t + 0.5, "endComputeMs": t + lat - 0.5,
                     "startD2hMs": t + lat - 0.5, "endD2hMs": t + lat,
                     "h2dMs": 0.5, "computeMs": lat - 1.0, "d2hMs": 0.5, "latencyMs": lat})
    # execute
    got = parse_export_times(json.dumps(recs))
    # assert: ranks q/100 * 4 over 1 2 3 4 10: p50 = 3, p90 = 4 + .6*6, p95 = 4 + .8*6,
    # p99 = 4 + .96*6
    assert got["count"] == 5
    assert [got[f"latency_ms_p{q}"] for q in (50, 90, 95, 99)] == pytest.approx(
        [3.0, 7.6, 8.8, 9.76])
    assert [got[f"gpu_compute_ms_p{q}"] for q in (50, 90, 95, 99)] == pytest.approx(
        [2.0, 6.6, 7.8, 8.76])
    assert (got["latency_ms_min"], got["latency_ms_max"]) == (1.0, 10.0)
    assert got["latency_ms_mean"] == pytest.approx(4.0)
    assert got["latency_ms_cv_pct"] == pytest.approx(100 * 10 ** 0.5 / 4)  # variance 50/5
    # walltime: first H2D start 100, last D2H end 180 + 4 = 184 -> 84 ms for 5 queries
    assert got["walltime_ms"] == pytest.approx(84.0)
    assert got["throughput_qps"] == pytest.approx(5000 / 84)
    assert got["h2d_ms_mean"] == got["d2h_ms_mean"] == 0.5
    assert got["enqueue_ms_mean"] == pytest.approx(0.25)


def test_parse_export_times_accepts_json_text_and_derives_missing_durations():
    text = (FIX / "times.json").read_text()
    full = parse_export_times(text)
    stripped = [{k: v for k, v in r.items() if k in {
        "startH2dMs", "endH2dMs", "startComputeMs", "endComputeMs", "startD2hMs", "endD2hMs"}}
        for r in _records()]
    derived = parse_export_times(stripped)
    for key in ("latency_ms_p50", "latency_ms_p99", "gpu_compute_ms_mean", "throughput_qps"):
        assert derived[key] == pytest.approx(full[key], abs=1e-9)
    with pytest.raises(ValueError):
        parse_export_times("[]")


def test_parse_export_profile_drops_count_header():
    layers = parse_export_profile(FIX / "profile.json")
    names = [layer["name"] for layer in layers]
    assert names[1:3] == ["/conv1/Conv + /relu1/Relu", "/pool/MaxPool"]
    assert len(layers) == 6 and all("count" not in layer for layer in layers)
    assert layers[3]["averageMs"] == 0.436 and layers[3]["percentage"] == 49.328
    assert sum(layer["timeMs"] for layer in layers) == pytest.approx(44.194)


def test_parse_layer_info_detailed():
    info = parse_layer_info(FIX / "layers.json")
    assert info["num_layers"] == 5
    assert info["layer_types"] == {"Reformat": 2, "CaskConvolution": 1, "CudnnPooling": 1,
                                   "CaskGemmConvolution": 1}
    assert info["output_dtypes"] == {"FP16": 4, "FP32": 1}
    assert info["bindings"] == ["input", "logits"]
    names_only = parse_layer_info({"Layers": ["conv1", "fc"], "Bindings": []})
    assert names_only["num_layers"] == 2 and names_only["layer_types"] == {}


def test_parse_performance_summary_fixture():
    s = parse_performance_summary((FIX / "perf_summary.log").read_text())
    assert s["throughput_qps"] == 1081.86
    assert s["latency"] == {"min": 0.866, "max": 1.277, "mean": 0.920667, "median": 0.875,
                            "p90": 1.004, "p95": 1.277, "p99": 1.277}
    assert s["gpu_compute_time"]["mean"] == 0.850167 and s["gpu_compute_time"]["p90"] == 0.931
    assert s["enqueue_time"]["median"] == 0.011
    assert s["h2d_latency"]["mean"] == 0.05 and s["d2h_latency"]["max"] == 0.022
    assert s["total_host_walltime_s"] == 0.011092 and s["total_gpu_compute_time_s"] == 0.010202
    assert set(s) == {"throughput_qps", "latency", "enqueue_time", "h2d_latency",
                      "gpu_compute_time", "d2h_latency", "total_host_walltime_s",
                      "total_gpu_compute_time_s"}


def test_summary_cross_checks_export_times():
    """Means, median and throughput agree; trtexec's percentiles are nearest-rank, ours are
    numpy's linear interpolation, so p90 differs on 12 samples (1.004 vs 0.9950)."""
    s = parse_performance_summary((FIX / "perf_summary.log").read_text())
    t = parse_export_times(FIX / "times.json")
    assert t["latency_ms_mean"] == pytest.approx(s["latency"]["mean"], rel=1e-5)
    assert t["latency_ms_p50"] == pytest.approx(s["latency"]["median"], rel=1e-9)
    assert t["gpu_compute_ms_mean"] == pytest.approx(s["gpu_compute_time"]["mean"], rel=1e-5)
    assert t["throughput_qps"] == pytest.approx(s["throughput_qps"], rel=1e-5)
    assert t["latency_ms_p90"] == pytest.approx(0.995) != s["latency"]["p90"]


def test_parse_performance_summary_older_layout_and_absent_block():
    old = ("[I] === Performance summary ===\n"
           "[I] Throughput: 2.5e+03 qps\n"
           "[I] Latency: min = 0.4 ms, max = 0.6 ms, mean = 0.5 ms, median = 0.5 ms, "
           "percentile(99%) = 0.59 ms\n"
           "[I] End-to-End Host Latency: min = 0.7 ms, max = 1.1 ms, mean = 0.8 ms, "
           "median = 0.8 ms, percentile(99.9%) = 1.05 ms\n"
           "[I] \n[I] Total Host Walltime: 3.001 s\n")
    s = parse_performance_summary(old)
    assert s["throughput_qps"] == 2500.0 and s["latency"]["p99"] == 0.59
    assert s["end_to_end_host_latency"]["p99.9"] == 1.05
    assert "total_host_walltime_s" not in s  # the block ends at the blank line
    assert parse_performance_summary("&&&& FAILED TensorRT.trtexec") == {}


# --------------------------------------------------------------------- subprocess boundary
@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake `trtexec` on PATH (see module docstring); returns the argv record file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "trtexec"
    shutil.copy(FIX / "fake_trtexec.sh", exe)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.delenv("ENGINEFORGE_TRTEXEC", raising=False)
    for var in ("FAKE_TRT_VERSION", "FAKE_TRTEXEC_FAIL", "FAKE_TRTEXEC_NO_TIMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FAKE_TRTEXEC_FIXTURES", str(FIX))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # a fresh probe cache
    argv = tmp_path / "argv.txt"
    monkeypatch.setenv("FAKE_TRTEXEC_ARGV", str(argv))
    return argv


def test_self_description():
    cls = backend_class("trtexec")
    assert cls is TrtexecBackend and cls.name == "trtexec"
    assert cls.artifact == "engine.plan" and cls.settings_section == "tensorrt"
    assert cls.builds_from == "onnx" and cls.device_class == "gpu"
    assert (cls.timing_cache, cls.multi_profile, cls.flags_mode) == (True, True, True)
    assert cls.tools == ()  # its version is the binary's banner, not a package's
    assert TrtexecBackend().device() == gpu_device()


def test_availability_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ENGINEFORGE_TRTEXEC", raising=False)
    backend = TrtexecBackend()
    avail = backend.availability()
    assert not avail.ok and avail.reason == "trtexec not found on PATH"
    assert "nvcr.io/nvidia/tensorrt:<tag>" in avail.how and "ENGINEFORGE_TRTEXEC" in avail.how
    assert backend.runnable("fp16") == (False, "trtexec not found on PATH")
    with pytest.raises(BackendUnavailable, match="trtexec not found on PATH"):
        backend.build(request(tmp=tmp_path))


def test_availability_found_reads_banner(fake):
    backend = TrtexecBackend()
    avail = backend.availability()
    assert avail.ok and avail.version == "10.8.0"
    assert avail.line("trtexec") == "trtexec: available (10.8.0)"
    assert fake.read_text().split() == ["--help"]
    assert backend.runnable("int8") == (True, "")


def test_version_probe_is_cached_on_disk(fake, tmp_path, monkeypatch):
    # setup: a first probe runs `trtexec --help` and stores the version
    exe = shutil.which("trtexec")
    assert TrtexecBackend().availability().version == "10.8.0"
    cache = tmp_path / "xdg-cache" / "engineforge" / "trtexec-versions.json"
    (key,) = json.loads(cache.read_text())
    assert key.startswith(f"{os.path.realpath(exe)}:{os.path.getsize(exe)}:")
    fake.unlink()
    # execute: new backend objects (a new workflow parse), same binary
    monkeypatch.setenv("FAKE_TRT_VERSION", "110000")
    again = TrtexecBackend().availability()
    # assert: answered from the cache, the binary never ran
    assert again.version == "10.8.0" and not fake.exists()
    # execute: the binary changes (size and mtime): probed again
    with open(exe, "a") as f:
        f.write("# upgraded\n")
    assert TrtexecBackend().availability().version == "11.0.0"
    assert fake.read_text().split() == ["--help"]
    assert len(json.loads(cache.read_text())) == 2


def test_version_probe_survives_an_unwritable_cache(fake, tmp_path, monkeypatch):
    # setup: XDG_CACHE_HOME is a file, so the cache directory cannot be made
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    # execute / assert: a cache only; the probe still answers
    assert probe_version(shutil.which("trtexec")) == (10, 8, 0)
    assert TrtexecBackend().availability().ok


def test_availability_env_override_and_no_banner(fake, tmp_path, monkeypatch):
    custom = tmp_path / "bin" / "trtexec-11"
    shutil.copy(FIX / "fake_trtexec.sh", custom)
    custom.chmod(0o755)
    monkeypatch.setenv("ENGINEFORGE_TRTEXEC", str(custom))
    monkeypatch.setenv("FAKE_TRT_VERSION", "110000")
    assert TrtexecBackend().availability().version == "11.0.0"
    mute = tmp_path / "bin" / "mute"
    mute.write_text("#!/bin/sh\necho usage\n")
    mute.chmod(0o755)
    monkeypatch.setenv("ENGINEFORGE_TRTEXEC", str(mute))
    avail = TrtexecBackend().availability()
    assert not avail.ok and "no TensorRT version" in avail.reason


def test_build_writes_engine_and_reports(fake, tmp_path):
    req = request(tmp=tmp_path)
    result = TrtexecBackend().build(req)
    engine = tmp_path / "engines" / "resnet18.fp16.engine"
    assert engine.read_bytes() == b"FAKE-TRT-ENGINE-0123456789"
    assert [p.name for p in engine.parent.iterdir()] == [engine.name]  # temp file renamed
    assert result["engine_bytes"] == 26 and result["trt_version"] == "10.8.0"
    assert result["build_time_s"] > 0 and result["precision_mode"] == "graph"
    assert result["log"] == str(tmp_path / "work" / "build.log")
    assert result["layer_info"] == str(tmp_path / "work" / "layers.json")
    assert parse_layer_info(result["layer_info"])["num_layers"] == 5
    cmd = result["command"]
    assert cmd[0] == shutil.which("trtexec") and "--stronglyTyped" in cmd
    assert cmd[2].startswith(f"--saveEngine={engine.parent}/.{engine.name}.")
    assert fake.read_text().splitlines() == cmd[1:]  # what the process really received
    log = Path(result["log"]).read_text()
    assert log.startswith("$ ") and "&&&& PASSED TensorRT.trtexec [TensorRT v100800]" in log


def test_build_failure_raises_with_log_tail(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "1")
    with pytest.raises(BuildError) as err:
        TrtexecBackend().build(request("int8", "flags", calib=CALIB, tmp=tmp_path))
    msg = str(err.value)
    assert "model=resnet18" in msg and "stage=build" in msg and "int8 engine" in msg
    assert "exited with 1" in msg and "TensorRT 10.8.0" in msg
    assert "[E] Engine could not be created from network" in msg
    # only the last 20 log lines: noise 14..30, two errors, the FAILED banner
    assert "noise line 14\n" in msg and "noise line 13\n" not in msg
    assert list((tmp_path / "engines").iterdir()) == []  # the half-written temp file is gone


def test_build_refuses_flags_on_trt11_before_running(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRT_VERSION", "110000")
    with pytest.raises(BuildError, match="removed the builder precision flags"):
        TrtexecBackend().build(request("fp16", "flags", tmp=tmp_path))
    assert fake.read_text().split() == ["--help"]  # the build itself never ran


def test_bench_parses_export_times(fake, tmp_path):
    # setup
    work = tmp_path / "bench"
    settings = {**SETTINGS, "iterations": 30}
    shapes = {"input": [8, 3, 224, 224]}
    # execute
    result = TrtexecBackend().bench(tmp_path / "m.engine", shapes, settings, work)
    # assert: the BenchPoint fields, from the exportTimes records (figures by hand, above)
    extra = result["extra"]
    assert extra["source"] == "exportTimes"
    assert extra["trtexec"]["count"] == 12
    assert result["batch"] == 8 and result["iterations"] == 12
    assert [result[f"p{q}_ms"] for q in (50, 90, 95, 99)] == pytest.approx(
        [FIXTURE_LATENCY[q] for q in (50, 90, 95, 99)], abs=1e-9)
    assert [extra["trtexec"][f"gpu_compute_ms_p{q}"] for q in (50, 90, 95, 99)] == (
        pytest.approx([FIXTURE_COMPUTE[q] for q in (50, 90, 95, 99)], abs=1e-9))
    assert result["mean_ms"] == pytest.approx(11.048 / 12)
    assert result["min_ms"] == 0.866
    assert result["cv"] == pytest.approx(0.113679 / 0.920667, abs=1e-6)  # std / mean
    assert result["throughput_per_s"] == pytest.approx(8 * 12 / 11.092 * 1000)
    assert result["warmup"] == 200.0  # trtexec warms up for a time (ms), not a count
    assert "shapes" not in result  # the stage adds the shapes it asked for
    assert extra["pinned"] == {"warmup_ms": 200.0, "iterations": 30, "duration_s": 3.0,
                               "avg_runs": 10, "use_cuda_graph": False,
                               "no_data_transfers": False, "use_spin_wait": False,
                               "separate_profile_run": True}
    assert extra["trt_version"] == "10.8.0"
    assert len(extra["layer_profile"]) == 6
    assert extra["summary"]["throughput_qps"] == 1081.86
    assert extra["trtexec"]["stdout_rel_diff"] == pytest.approx(0, abs=1e-6)  # JSON = stdout
    assert fake.read_text().splitlines() == extra["command"][1:]
    assert "--iterations=30" in extra["command"] and "--separateProfileRun" in extra["command"]
    assert extra["log"] == str(work / "bench.log")


def test_bench_output_validates_as_bench_point(fake, tmp_path):
    # execute
    shapes = {"input": [8, 3, 224, 224]}
    result = TrtexecBackend().bench(tmp_path / "m.engine", shapes, SETTINGS, tmp_path / "w")
    point = BenchPoint(shapes=shapes, **result)
    # assert: the same fields as every backend, trtexec's own facts under extra
    assert set(result) == set(BenchPoint.model_fields) - {"shapes"}
    assert point.p50_ms == 0.875 and point.batch == 8 and point.shapes == shapes
    assert BenchPoint.model_validate(point.model_dump(mode="json")) == point


def test_bench_falls_back_to_summary_without_export_times(fake, tmp_path, monkeypatch):
    # setup
    work = tmp_path / "bench"
    work.mkdir()
    (work / "times.json").write_text((FIX / "times.json").read_text())  # a stale earlier run
    monkeypatch.setenv("FAKE_TRTEXEC_NO_TIMES", "1")
    shapes = {"input": [8, 3, 224, 224]}
    # execute
    result = TrtexecBackend().bench(tmp_path / "m.engine", shapes, SETTINGS, work)
    # assert: stdout's nearest-rank figures; the stale file was not read
    extra = result["extra"]
    assert extra["source"] == "performance_summary"
    assert result["p50_ms"] == 0.875 and result["p99_ms"] == 1.277
    assert result["throughput_per_s"] == pytest.approx(8 * 1081.86)
    assert extra["trtexec"]["throughput_qps"] == 1081.86
    assert extra["trtexec"]["gpu_compute_ms_mean"] == 0.850167
    assert result["iterations"] == 10 and result["min_ms"] == 0.866  # pinned count; summary min
    BenchPoint(shapes=shapes, **result)


def test_bench_failure_raises_with_log_tail(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "1")
    with pytest.raises(BenchError) as err:
        TrtexecBackend().bench(tmp_path / "m.engine", {}, SETTINGS, tmp_path / "bench")
    assert "stage=bench" in str(err.value) and "Engine could not be created" in str(err.value)


# --------------------------------------------------------------------- the stages
@pytest.fixture
def in_process(monkeypatch):
    """Stage bodies in the test process. The runner's worker children are forked from a fork
    server that keeps the environment it started with, so they would not see this test's
    fake on PATH; the runner is otherwise the same."""
    monkeypatch.setenv("ENGINEFORGE_ISOLATION", "0")
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")  # no MLflow build cache here


def test_bench_stage_times_every_profile_point(fake, in_process, tiny_models, tiny_workspace):
    # setup: an engine file and a build sidecar (the bench hashes them, trtexec loads the engine)
    tmp = tiny_workspace
    (tmp / "engine.plan").write_bytes(b"FAKE-TRT-ENGINE")
    (tmp / "build.json").write_text("{}")
    # execute
    side = run_stage("bench", tiny_models, "tinyfcn",
                     {"engine": tmp / "engine.plan", "build": tmp / "build.json"},
                     {"sidecar": tmp / "bench.json"}, tmp,
                     backend="trtexec", precision="fp16", profile="small")
    # assert
    r = BenchResult.model_validate(side["result"])
    assert (r.status, r.backend, r.precision, r.profile) == ("ok", "trtexec", "fp16", "small")
    p50 = FIXTURE_LATENCY[50]  # the fake trtexec writes the fixture's records every time
    assert {w: p.p50_ms for w, p in r.points.items()} == pytest.approx(
        {"min": p50, "opt": p50, "max": p50}, abs=1e-9)
    assert side["result"]["points"]["opt"]["p50_ms"] == pytest.approx(p50, abs=1e-9)
    assert r.points["opt"].shapes == {"img": [1, 1, 16, 16]}
    assert r.points["max"].batch == 2 and r.points["max"].extra["source"] == "exportTimes"
    opt_cmd = r.points["opt"].extra["command"]
    assert f"--loadEngine={tmp / 'engine.plan'}" in opt_cmd
    assert "--shapes=img:1x1x16x16" in opt_cmd
    assert "--iterations=3" in opt_cmd  # the model's bench.iterations
    work = Layout(str(tmp / "artifacts")).bench_work("tinyfcn", "trtexec", "fp16", "small")
    assert r.points["opt"].extra["log"] == f"{work}/bench.log"


def test_build_stage_with_timing_cache(fake, in_process, tiny_models, tiny_workspace):
    # setup
    tmp = tiny_workspace
    (tmp / "model.onnx").write_bytes(b"onnx")
    out = tmp / "out"
    # execute
    side = run_stage("build", tiny_models, "tinyfcn", {"onnx": tmp / "model.onnx"},
                     {"engine": out / "engine.plan", "sidecar": out / "build.json"}, tmp,
                     backend="trtexec", precision="fp16", profile="small")
    # assert
    r = BuildResult.model_validate(side["result"])
    assert (r.status, r.backend, r.precision, r.profile) == ("ok", "trtexec", "fp16", "small")
    assert r.backend_version == r.extra["trt_version"] == "10.8.0"
    assert (out / "engine.plan").read_bytes() == b"FAKE-TRT-ENGINE-0123456789"
    assert r.engine_bytes == 26 and not list(out.glob(".*"))
    cmd = r.extra["command"]
    assert "--stronglyTyped" in cmd and "--minShapes=img:1x1x8x8" in cmd
    # one timing cache per device class and TensorRT version, shared by every build
    cache_dir = Layout(str(tmp / "artifacts")).timing_cache_dir()
    (timing,) = [a for a in cmd if a.startswith("--timingCacheFile=")]
    assert timing.startswith(f"--timingCacheFile={cache_dir}/timing-")
    assert timing.endswith("-10.8.0.cache") and Path(cache_dir).is_dir()
    assert side["device"] == gpu_device()


def test_build_stage_flags_mode_int8_uses_calibration_cache(fake, in_process, tiny_models,
                                                            tiny_workspace):
    # setup: TensorRT 10 flags mode builds the fp32 ONNX with --int8 --calib=<cache>
    tmp = tiny_workspace
    models = copy.deepcopy(tiny_models)
    models["tinyfcn"]["tensorrt"]["precision_mode"] = "flags"
    (tmp / "fp32.onnx").write_bytes(b"onnx")
    (tmp / "int8.cache").write_bytes(b"calib")
    # execute
    side = run_stage("build", models, "tinyfcn",
                     {"fp32": tmp / "fp32.onnx", "calib_cache": tmp / "int8.cache",
                      "calibration": tmp / "calib_fcn.npz"},
                     {"engine": tmp / "out/engine.plan", "sidecar": tmp / "out/build.json"},
                     tmp, backend="trtexec", precision="int8", profile="small")
    # assert
    r = BuildResult.model_validate(side["result"])
    assert r.precision_mode == "flags" and r.extra["precision_mode"] == "flags"
    cmd = r.extra["command"]
    assert cmd[1] == f"--onnx={tmp / 'fp32.onnx'}"
    assert "--int8" in cmd and f"--calib={tmp / 'int8.cache'}" in cmd
    assert "--stronglyTyped" not in cmd
    assert set(side["inputs"]) == {"fp32", "calib_cache", "calibration"}
