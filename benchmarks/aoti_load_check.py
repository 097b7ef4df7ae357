"""Does an AOTInductor package load on this machine? (issue 10: on the H100 machine with torch
2.11+cu130, ``aoti_load_package`` segfaults.)

Builds a tiny conv net's package per device (cuda when present, cpu) and loads each in a
fresh process with faulthandler on. For a crash it records the C++ runtime facts (the
compiler, the libstdc++ the process maps, what the package's wrapper library links), loads
again with the compiler's own libstdc++ preloaded, and (``--gdb``) re-runs the load under
cuda-gdb for a native backtrace. Writes DIR/aoti_load.json and DIR/<device>-load.log.

    python benchmarks/aoti_load_check.py --out DIR [--gdb]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

WORKFLOW = Path(__file__).resolve().parents[1] / "workflow"
LOAD = """
import os, sys, torch
if os.environ.get("SHARE_LIBSTDCXX"):  # what the torch-inductor backend does
    sys.path.insert(0, os.environ["SHARE_LIBSTDCXX"])
    from engineforge.backends.torch_inductor import share_libstdcxx
    share_libstdcxx()
maps = {ln.split()[-1] for ln in open("/proc/self/maps") if "libstdc++" in ln}
print("LIBSTDCXX", sorted(maps), flush=True)
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


def runtime_facts(pkg: Path, unpacked: Path) -> dict:
    """The compiler, the libstdc++ a torch process maps, and the wrapper library's links."""
    import zipfile

    def sh(*cmd):
        p = subprocess.run(cmd, capture_output=True, text=True)
        return (p.stdout + p.stderr).strip()

    with zipfile.ZipFile(pkg) as z:
        z.extractall(unpacked)
    wrappers = sorted(unpacked.rglob("*.so"))
    maps = sh(sys.executable, "-c", "import torch; print(sorted({l.split()[-1] for l in "
              "open('/proc/self/maps') if 'libstdc++' in l}))")
    return {"compiler": sh("c++", "--version").splitlines()[0],
            "compiler_libstdcxx": os.path.realpath(sh("c++", "-print-file-name=libstdc++.so.6")),
            "process_libstdcxx": [os.path.realpath(p) for p in eval(maps.splitlines()[-1])],
            "wrapper_links": {w.name: [ln.strip() for ln in sh("ldd", str(w)).splitlines()
                                       if "stdc++" in ln or "gcc_s" in ln or "not found" in ln]
                              for w in wrappers}}


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gdb", action="store_true", help="a cuda-gdb backtrace of a crash")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": {}}
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        pkg = out / f"tiny-{device}.pt2"
        row = report["devices"][device] = {"build_s": build(device, pkg)}
        cmd = [sys.executable, "-X", "faulthandler", "-c", LOAD, str(pkg), device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        row |= {"exit": proc.returncode, "loaded": "LOADED" in proc.stdout}
        log = proc.stdout + proc.stderr
        if proc.returncode:
            row |= runtime_facts(pkg, out / f"tiny-{device}")
            row["preloaded"] = {}
            for lib in {row["compiler_libstdcxx"], *row["process_libstdcxx"]}:
                env = {**os.environ, "LD_PRELOAD": lib}
                again = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                       env=env)
                row["preloaded"][lib] = {"exit": again.returncode,
                                         "loaded": "LOADED" in again.stdout}
                log += f"\n---- LD_PRELOAD={lib} ----\n" + again.stdout + again.stderr[-3000:]
            shared = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "SHARE_LIBSTDCXX": str(WORKFLOW)})
            row["libstdcxx_made_global"] = {"exit": shared.returncode,
                                            "loaded": "LOADED" in shared.stdout}
            log += "\n---- libstdc++ made global (RTLD_GLOBAL) ----\n" + shared.stdout + \
                shared.stderr[-3000:]
        if proc.returncode and args.gdb and shutil.which("cuda-gdb"):
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
