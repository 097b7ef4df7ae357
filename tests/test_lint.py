"""The workflow stays lint-clean: `snakemake --lint` and `snakefmt --check`.

Snakemake runs in a copy of the project (checkout_guard's ``project_copy``): with the checkout
as its working directory it would create artifacts/ and .snakemake/ there, and its parse-time
integrity sweep and stale-lock removal would act on the developer's own outputs. snakefmt
only reads, so it checks the real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.e2e  # Snakemake parses the workflow
def test_snakemake_lint_is_clean(project_copy):
    proc = subprocess.run([str(BIN / "snakemake"), "--lint", "--cores", "1"], cwd=project_copy,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e  # a dry run of the workflow
def test_parsing_the_workflow_imports_nothing_heavy(project_copy):
    """DAG parsing (`snakemake -n`) imports no torch, ONNX Runtime, TensorRT, ModelOpt,
    onnxsim, MLflow or matplotlib, and runs no backend binary."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(BIN / "snakemake"), "-n",
                           "--quiet"], cwd=project_copy, capture_output=True, text=True,
                          env={**os.environ, "ENGINEFORGE_TRTEXEC": "/nonexistent/trtexec"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "engineforge.layout" in imported  # the check itself sees our imports
    heavy = {"torch", "onnxruntime", "tensorrt_rtx_bindings", "tensorrt", "modelopt",
             "onnxsim", "mlflow", "matplotlib"}
    assert not heavy & imported
