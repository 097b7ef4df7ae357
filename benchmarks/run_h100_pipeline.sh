#!/usr/bin/env bash
# Issue 10's H100 run: the workflow on benchmarks/h100_zoo.yaml (torch-inductor on the GPU),
# resumable (Snakemake picks up where a previous call stopped). On the borrowed H100 the
# packages it lacks travel as wheels in .whl (docs/benchmarks.md lists them).
#   OUT=dir BUDGET_S=540 bash benchmarks/run_h100_pipeline.sh
set -u
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# onnxruntime-gpu unpacked in a directory of its own (too large to travel as one wheel:
# docs/benchmarks.md); ahead of the machine's CPU-only onnxruntime
[ -n "${ORT_GPU_SITE:-}" ] && export PYTHONPATH=$ORT_GPU_SITE:${PYTHONPATH:-}
export PYTHONPATH=$PWD/workflow:${PYTHONPATH:-} PYTHONUNBUFFERED=1 ENGINEFORGE_CACHE=0
# the fork server imports torch: no CUDA initialisation before its children fork
export PYTORCH_NVML_BASED_CUDA_CHECK=1
OUT=${OUT:-benchmarks/results/h100}
mkdir -p "$OUT" artifacts-h100/checkpoints
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
  > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, onnx, onnxruntime as o; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'onnx', onnx.__version__, 'onnxruntime', o.__version__, \
o.get_available_providers())" > "$OUT/versions.txt"
# mobilenet_v3_small's checkpoint: seeded random weights, BatchNorm statistics calibrated
[ -s artifacts-h100/checkpoints/mobilenet_v3_small.safetensors ] || python3 -c "import sys; sys.path[:0] = ['.', 'workflow']
from benchmarks.bench_gpu import _torchvision_state; from safetensors.torch import save_file
save_file(_torchvision_state('mobilenet_v3_small'), sys.argv[1])" \
  artifacts-h100/checkpoints/mobilenet_v3_small.safetensors || exit 1
timeout -k 20 "${BUDGET_S:-540}" python3 -m snakemake --configfile "${CONFIG:-benchmarks/h100_zoo.yaml}" \
  --cores 16 > "$OUT/snakemake.log" 2>&1
echo "snakemake rc=$?" | tee -a "$OUT/snakemake.log"
python3 benchmarks/h100_table.py artifacts-h100 > "$OUT/table.md" 2>&1
cp artifacts-h100/summary.md "$OUT/" 2>/dev/null
find artifacts-h100 \( -name '*.json' -o -name '*.md' -o -name '*.log' \) -print0 \
  | tar czf "$OUT/sidecars.tgz" --null -T -
tail -5 "$OUT/snakemake.log"; cat "$OUT/table.md"
