"""Smoke run of the torch-inductor backend outside Snakemake (for a GPU machine that lacks
the workflow's dependencies): export a torchvision/tiny model with torch.export, build
AOTInductor packages per precision through the backend, bench them (with and without CUDA
graphs on a GPU), and print each result as one JSON line.

    PYTHONPATH=workflow python benchmarks/torch_inductor_smoke.py [--model tiny|resnet18|...]
        [--precisions fp32 fp16] [--batch 1 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from engineforge.backends.base import BuildRequest  # noqa: E402
from engineforge.backends.torch_inductor import TorchInductorBackend  # noqa: E402


def make(name: str, size: int):
    torch.manual_seed(0)
    if name == "tiny":
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(8, 5)).eval(), 8
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval(), size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--batch", nargs=2, type=int, default=[1, 8], metavar=("MIN", "MAX"))
    ap.add_argument("--out", default="artifacts-smoke")
    ap.add_argument("--cuda-graphs", default="auto")
    a = ap.parse_args()
    net, size = make(a.model, a.size)
    lo, hi = a.batch
    root = Path(a.out) / a.model
    program = root / "export" / "model.pt2"
    program.parent.mkdir(parents=True, exist_ok=True)
    x = torch.rand(max(hi, 2), 3, size, size)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    io = {"inputs": ["x"], "outputs": ["y"], "dims": {"x": {0: "batch"}}, "ranks": {"x": 4},
          "dtypes": {"x": "float32"}}
    torch.export.save(ep, str(program), extra_files={"engineforge.json": json.dumps(io)})
    be = TorchInductorBackend()
    profile = {"x": {"min": [lo, 3, size, size], "opt": [hi, 3, size, size],
                     "max": [hi, 3, size, size]}}
    print(json.dumps({"device": be.device(), "torch": torch.__version__}), flush=True)
    for precision in a.precisions:
        engine = root / "build" / be.name / precision / "p" / be.artifact
        engine.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        facts = be.build(BuildRequest(model=a.model, precision=precision, onnx_path=None,
                                      engine_path=engine, work_dir=engine.parent,
                                      profiles=[profile], program=program))
        print(json.dumps({"precision": precision, "build": facts,
                          "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
        for batch in (lo, hi):
            stats = be.bench(engine, {"x": [batch, 3, size, size]},
                             {"warmup": 10, "iterations": 100, "threads": 2,
                              "cuda_graphs": a.cuda_graphs}, engine.parent)
            print(json.dumps({"precision": precision, "batch": batch, "bench": stats},
                             default=str), flush=True)
        with torch.inference_mode():  # eager fp32 on the same device, for scale
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            ref = net.to(dev)
            xi = torch.rand(hi, 3, size, size, device=dev)
            for _ in range(5):
                ref(xi)
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                ref(xi)
            if dev == "cuda":
                torch.cuda.synchronize()
            print(json.dumps({"eager_fp32_ms_batch_max": (time.perf_counter() - t0) / 20 * 1e3}),
                  flush=True)


if __name__ == "__main__":
    main()
