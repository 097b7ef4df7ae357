"""Does an AOTInductor package load on this machine? (issue 10: on the H100 machine with torch
2.11+cu130, ``aoti_load_package`` segfaults.)

Builds a tiny conv net's package per device (cuda when present, cpu) and loads each in a
fresh process with faulthandler on; for a crash, re-runs the load under cuda-gdb (when it is
on the PATH) for a native backtrace. Writes DIR/aoti_load.json and DIR/<device>-load.log.

    python benchmarks/aoti_load_check.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

LOAD = """
import sys, torch
model = torch._inductor.aoti_load_package(sys.argv[1])
out = model(torch.rand(2, 1, 8, 8, device=sys.argv[2]))
print("LOADED", tuple(out.shape), flush=True)
"""


def build(device: str, path: Path) -> float:
    import time

    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval().to(device)
    x = torch.rand(2, 1, 8, 8, device=device)
    t0 = time.perf_counter()
    program = torch.export.export(net, (x,))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return round(time.perf_counter() - t0, 1)


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": {}}
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        pkg = out / f"tiny-{device}.pt2"
        row = report["devices"][device] = {"build_s": build(device, pkg)}
        cmd = [sys.executable, "-X", "faulthandler", "-c", LOAD, str(pkg), device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        row |= {"exit": proc.returncode, "loaded": "LOADED" in proc.stdout}
        log = proc.stdout + proc.stderr
        if proc.returncode and shutil.which("cuda-gdb"):
            gdb = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 40",
                                  "--args", *cmd], capture_output=True, text=True,
                                 timeout=300)
            log += "\n---- cuda-gdb ----\n" + gdb.stdout[-12000:] + gdb.stderr[-4000:]
        (out / f"{device}-load.log").write_text(log)
        pkg.unlink(missing_ok=True)
    (out / "aoti_load.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
