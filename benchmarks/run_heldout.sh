#!/usr/bin/env bash
# The held-out sweep (docs/model-coverage.md), from the repository root, on the CPU:
# 12 architectures x 5 precisions x 3 backends; about 40 min on 2 cores.
set -eu
.venv/bin/python benchmarks/heldout_nets.py
.venv/bin/engineforge run --configfile benchmarks/heldout_zoo.yaml --keep-going || true
echo "summary: artifacts-heldout/summary.md"
