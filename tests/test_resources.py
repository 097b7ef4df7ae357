"""What each job asks its scheduler for (engineforge/resources.py): from the typed settings,
GPU only for a GPU backend's build/audit/bench (and the baseline beside them), never for a
CPU stage; checked per job, and on every job a dry run of the real workflow plans."""

from __future__ import annotations

import math
import re

import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge import config, resources
from workflow_helpers import snakemake, write_config

CPU_STAGES = ("export", "profiles", "simplify", "precision", "ort_quantize", "localise",
              "repair", "drift", "gate", "track", "report", "summary")


def _model(tmp_path, **defaults):
    write_tiny_workspace(tmp_path)
    raw = tiny_raw_config()
    raw["defaults"] |= defaults
    return config.resolve(raw, tmp_path)["models"]["tinycls"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("stage", ["build", "audit", "bench"])
@pytest.mark.parametrize("backend, on_gpu", [
    ("tensorrt", {"cpu": True, "cuda": True}),       # TensorRT runs only on a GPU
    ("trtexec", {"cpu": True, "cuda": True}),
    ("onnxruntime", {"cpu": False, "cuda": True}),    # follows resources.device
    ("torch-inductor", {"cpu": False, "cuda": True}),
    ("tensorrt-rtx", {"cpu": False, "cuda": None}),   # builds on CPU; runs on a GPU
])
def test_a_gpu_backends_jobs_ask_for_one_gpu(tmp_path, device, stage, backend, on_gpu):
    # setup
    m = _model(tmp_path, resources={"device": device, "gpu_partition": "gpu",
                                    "cpu_partition": "cpu"})
    want = on_gpu[device] if on_gpu[device] is not None else stage != "build"
    # execute
    r = resources.job_resources(m, stage, backend)
    # assert
    assert r["gpu"] == int(want)
    assert r["slurm_partition"] == ("gpu" if want else "cpu")


@pytest.mark.parametrize("stage", CPU_STAGES)
def test_cpu_stages_never_ask_for_a_gpu(tmp_path, stage):
    m = _model(tmp_path, resources={"device": "cuda", "gpu_partition": "gpu"})
    r = resources.job_resources(m, stage, None)
    assert r["gpu"] == 0 and r["slurm_partition"] == ""


def test_numbers_come_from_the_typed_settings(tmp_path):
    # setup: a model that sizes its builds and benches, and limits build time
    m = _model(tmp_path, resources={"build": {"cpus": 6, "mem_mb": 30000},
                                    "runtime_margin_min": 3},
               time_limits={"build": 601}, bench={"threads": 4, "iterations": 3})
    # execute
    build = resources.job_resources(m, "build", "onnxruntime")
    bench = resources.job_resources(m, "bench", "onnxruntime")
    baseline = resources.job_resources(m, "baseline")
    # assert: the scheduler's limit is ours plus the margin (our one line fires first)
    assert (build["cpus_per_task"], build["mem_mb"], build["runtime"]) == (6, 30000, 11 + 3)
    assert build["slurm_extra"] == ""
    # a bench gets the cores it times with, and its node to itself
    assert bench["cpus_per_task"] == 4 and bench["slurm_extra"] == "--exclusive"
    assert baseline["cpus_per_task"] == 4 and baseline["gpu"] == 0
    # jobs of no model (summary, report) get the defaults
    assert resources.job_resources(None, "summary")["mem_mb"] == 2048


def _planned_resources(ws) -> list[tuple[str, dict, dict]]:
    """(rule, wildcards, resources) of every job the dry run of the workflow plans."""
    text = snakemake(ws, "--dry-run").stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        res = re.search(r"^\s*resources: (.*)$", block, re.M)
        if not head or not res:
            continue
        wc = re.search(r"^\s*wildcards: (.*)$", block, re.M)
        parse = lambda s: dict(kv.split("=", 1) for kv in s.split(", "))  # noqa: E731
        jobs.append((head.group(1), parse(wc.group(1)) if wc else {}, parse(res.group(1))))
    return jobs


@pytest.mark.e2e
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_planned_job_asks_for_what_its_stage_needs(tmp_path, device):
    """The real workflow's dry run: each job's resources as Snakemake hands them to the
    executor plugin (the Slurm plugin turns gpu=1 into --gpus=1 and leaves 0 / "" out)."""
    # setup
    write_tiny_workspace(tmp_path)
    raw = tiny_raw_config(precisions=("fp32", "int8"),
                          backends=("onnxruntime", "tensorrt-rtx", "torch-inductor"))
    raw["defaults"]["resources"] = {"device": device, "gpu_partition": "gpu"}
    write_config(tmp_path, raw)
    # execute
    jobs = _planned_resources(tmp_path)
    # assert
    rules = {rule for rule, _, _ in jobs}
    assert {"export", "simplify", "precision", "build_onnxruntime", "build_tensorrt_rtx",
            "build_torch_inductor", "audit", "bench", "bench_pytorch"} <= rules
    gpu_jobs = []
    for rule, wc, res in jobs:
        if rule == "all":  # the target rule: no work
            continue
        backend = wc.get("backend") or (rule.removeprefix("build_").replace("_", "-")
                                        if rule.startswith("build_") else None)
        gpu = int(res["gpu"])
        if gpu:
            gpu_jobs.append(rule)
        expected = device == "cuda" and (
            rule == "bench_pytorch"
            or (backend in ("onnxruntime", "torch-inductor")
                and rule in ("audit", "bench", f"build_{backend.replace('-', '_')}"))
            or (backend == "tensorrt-rtx" and rule in ("audit", "bench")))
        assert gpu == int(expected), (rule, wc, res)
        assert res["slurm_partition"] == ("gpu" if gpu else ""), (rule, wc, res)
        limit = config.resolve(raw, tmp_path)["models"]["tinycls"]["time_limits"]
        if rule == "simplify":
            assert int(res["runtime"]) == math.ceil(limit["simplify"] / 60) + 5
    assert bool(gpu_jobs) == (device == "cuda")
