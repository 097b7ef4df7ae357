"""Shared pytest setup: import paths and tiny-model configs for stage tests."""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# this checkout's engineforge first (also in a git worktree beside an editable install)
for p in (ROOT / "workflow", ROOT, FIXTURES):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session", autouse=True)
def temp_files_under_basetemp(tmp_path_factory):
    """Every temp file of the run, the child processes' too (inductor's cache, AOTInductor's
    unpacked packages), goes under pytest's base dir, which pytest prunes to the last 3 runs:
    left in /tmp, they had filled a CI machine's disk."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp", numbered=False)))
    mp.setattr(tempfile, "tempdir", None)
    from engineforge import signing  # the run's own signing key, not ~/.config's

    key = tmp_path_factory.mktemp("keys") / "signing.key"
    signing.generate(key)
    mp.setenv(signing.ENV_KEY_FILE, str(key))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def mlflow_schema_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema: creating one takes seconds (migrations),
    copying it milliseconds."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-schema")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow makes ./mlruns when it opens a store
        MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments(max_results=1)
    return root / "mlflow.db"


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch, mlflow_schema_db) -> str:
    """A fresh local MLflow store for this test (a copy of the empty one) as
    MLFLOW_TRACKING_URI, run from tmp_path (artifacts land in its ./mlruns); its URI."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(mlflow_schema_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def tiny_raw_config(precisions=("fp32",), backends=("onnxruntime",)) -> dict:
    """A config (as written by a user) with one tiny classifier and one tiny FCN."""
    return {
        "experiment": "engineforge-tests",
        "defaults": {"precisions": list(precisions), "backends": list(backends),
                     "bench": {"warmup": 1, "iterations": 3, "threads": 1},
                     "audit": {"samples": 8},
                     "precision": {"int8": {"calib_size": 8}, "fp8": {"calib_size": 8}}},
        "models": {
            "tinycls": {
                "task": "classification",
                "checkpoint": {"kind": "state_dict", "arch": "tinynets:TinyClassifier",
                               "path": "tinycls.pt"},
                "inputs": {"x": {"dtype": "float32", "shape": ["batch", 3, 8, 8]}},
                "profiles": {"b1-8": {"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8],
                                            "max": [8, 3, 8, 8]}}},
                "calibration": {"path": "calib.npz"},
                "evaluation": {"path": "eval.npz"},
            },
            "tinyfcn": {
                "checkpoint": {"kind": "state_dict", "arch": "tinynets:TinyFCN", "seed": 1},
                "inputs": {"img": {"shape": ["batch", 1, "h", "w"]}},
                "profiles": {
                    "small": {"img": {"min": [1, 1, 8, 8], "opt": [1, 1, 16, 16],
                                      "max": [2, 1, 32, 32]}},
                    "large": {"img": {"min": [1, 1, 32, 32], "opt": [1, 1, 48, 48],
                                      "max": [1, 1, 64, 64]}},
                },
                "calibration": {"path": "calib_fcn.npz"},
            },
        },
    }


def write_tiny_workspace(root: Path) -> None:
    """Checkpoint, calibration and labelled evaluation data for tiny_raw_config."""
    import tinynets

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "tinynets.py", root / "tinynets.py")
    torch.manual_seed(0)
    net = tinynets.TinyClassifier()
    torch.save(net.state_dict(), root / "tinycls.pt")
    x = tinynets.make_classifier_data(32)
    np.savez(root / "calib.npz", x=x)
    with torch.no_grad():
        labels = net(torch.from_numpy(x)).argmax(1).numpy()
    labels[:2] = (labels[:2] + 1) % 5  # reference accuracy < 1, like real labels
    np.savez(root / "eval.npz", x=x, labels=labels)
    g = np.random.default_rng(0)
    np.savez(root / "calib_fcn.npz", img=g.random((8, 1, 16, 16), dtype=np.float32))


@pytest.fixture
def tiny_workspace(tmp_path, monkeypatch):
    write_tiny_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_models(tiny_workspace):
    from engineforge import config

    return config.resolve(tiny_raw_config(), tiny_workspace)["models"]


def stage_job(stage: str, models: dict, model: str, inputs: dict, outputs: dict,
              workspace: Path, **wildcards):
    """A Job as the Snakemake rule would build it: the stage's own ``settings(m, w)``
    slice, tool versions, named inputs/outputs; logs and artifacts under ``workspace``."""
    from engineforge.job import Job
    from engineforge.runner import stage_module
    from engineforge.versions import tool_versions

    w = {"model": model, **wildcards}
    settings = stage_module(stage).settings(models[model], w)
    return Job(stage=stage, model=model, wildcards=w,
               inputs={k: Path(v) for k, v in inputs.items()},
               outputs={k: Path(v) for k, v in outputs.items()}, settings=settings,
               tools=tool_versions(stage, wildcards.get("backend")), device=None,
               log=Path(workspace) / "logs" / f"{stage}.log",
               artifacts=str(Path(workspace) / "artifacts"))


def run_stage(stage: str, models: dict, model: str, inputs: dict, outputs: dict,
              workspace: Path, **wildcards) -> dict:
    """Run one stage through the real runner (fingerprint, staging, crash-isolated body,
    sidecar) and return its sidecar. Errors surface as the runner's StageFailed line."""
    from engineforge.runner import run_job
    from engineforge.sidecar import read_json

    job = stage_job(stage, models, model, inputs, outputs, workspace, **wildcards)
    run_job(job)
    return read_json(job.outputs["sidecar"]) if "sidecar" in job.outputs else {}


# -- built zoos, each built once per session and shared read-only ------------------------------
ZOO_PRECISIONS = ("fp32", "int8")
ZOO_BACKENDS = ("onnxruntime", "tensorrt-rtx")
E2E_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
E2E_BACKENDS = ("onnxruntime", "tensorrt-rtx", "trtexec", "tensorrt")


def zoo_config() -> dict:
    """The standard zoo: both tiny models, fp32 + int8, on onnxruntime and TensorRT-RTX."""
    return tiny_raw_config(precisions=ZOO_PRECISIONS, backends=ZOO_BACKENDS)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Path:
    """The standard zoo built once (workspace with config.yaml, artifacts/, .snakemake/ and
    mlflow.db). Read-only: a test that changes anything takes ``zoo_copy``."""
    from workflow_helpers import snakemake, write_config

    ws = tmp_path_factory.mktemp("zoo")
    write_tiny_workspace(ws)
    write_config(ws, zoo_config())
    snakemake(ws)
    return ws


@pytest.fixture
def zoo_copy(zoo, tmp_path) -> Path:
    """This test's own copy of the standard zoo (mtimes kept: Snakemake plans nothing; its own
    mlflow.db)."""
    from workflow_helpers import copy_workspace

    return copy_workspace(zoo, tmp_path / "zoo")


class Built:
    """A finished workflow run: workspace, raw config, the snakemake process, and the sha256 of
    every file of the workspace before the run."""

    def __init__(self, ws, raw, proc, before):
        self.ws, self.raw, self.proc, self.before = ws, raw, proc, before


@pytest.fixture(scope="session")
def e2e_zoo(tmp_path_factory) -> Built:
    """The full matrix (4 precisions; onnxruntime, TensorRT-RTX, and trtexec / TensorRT, which
    are not installed here) run once, as `make run` runs it. Read-only."""
    from engineforge.sidecar import sha256_file
    from workflow_helpers import snakemake, write_config

    ws = tmp_path_factory.mktemp("e2e")
    write_tiny_workspace(ws)
    raw = tiny_raw_config(precisions=E2E_PRECISIONS, backends=E2E_BACKENDS)
    write_config(ws, raw)
    before = {p.relative_to(ws).as_posix(): sha256_file(p) for p in ws.rglob("*")
              if p.is_file()}
    return Built(ws, raw, snakemake(ws), before)
