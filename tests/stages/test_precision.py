"""Tests for engineforge.stages.precision on a tiny CNN (ModelOpt on CPU, ORT CPU)."""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_stage, stage_job
from engineforge.config import builtin_defaults, deep_merge
from engineforge.errors import PrecisionError
from engineforge.results import PrecisionResult
from engineforge.runner import StageFailed
from engineforge.settings import QUANTIZED
from engineforge.sidecar import fingerprint, read_json, sha256_file
from engineforge.stages import precision
from engineforge.versions import tool_versions

MARKERS = {  # what each precision must put into the graph
    "fp32": {"initializer": "FLOAT", "ops": set()},
    "fp16": {"initializer": "FLOAT16", "ops": {"Cast"}},
    "bf16": {"initializer": "BFLOAT16", "ops": {"Cast"}},
    "int8": {"initializer": "INT8", "ops": {"QuantizeLinear", "DequantizeLinear"}},
    "fp8": {"initializer": "FLOAT8E4M3FN", "ops": {"QuantizeLinear", "DequantizeLinear"}},
}


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # > 16 channels: ModelOpt's fp8 rules skip smaller convolutions (the first one here)
        self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """A tiny fp32 ONNX (dynamic batch), its calibration npz (float16 on disk), settings."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(TinyCNN().eval(), (torch.randn(2, 3, 16, 16),), root / "tiny.onnx",
                          dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", input=rng.standard_normal((32, 3, 16, 16)).astype(np.float16))
    m = deep_merge(builtin_defaults(), {
        "inputs": {"input": {"shape": ["batch", 3, 16, 16]}},
        "profiles": {"p": {"input": {"min": [1, 3, 16, 16], "opt": [2, 3, 16, 16],
                                     "max": [4, 3, 16, 16]}}},
        "calibration": {"path": "calib.npz"},
    })
    m["precision"]["int8"]["calib_size"] = 16
    return {"root": root, "onnx": root / "tiny.onnx", "m": m,
            "x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(autouse=True)
def _in_zoo(zoo, monkeypatch):
    """Model paths are relative to the working directory, as in a workflow run."""
    monkeypatch.chdir(zoo["root"])


@pytest.fixture
def workspace(tmp_path_factory) -> Path:
    """The runner's logs and failure records, apart from the outputs."""
    return tmp_path_factory.mktemp("ws")


def _inputs(zoo: dict, prec: str, workspace: Path, m: dict | None = None) -> dict:
    """The precision rule's named inputs: the ONNX, and calibration for int8/fp8 only.

    Each job reads its own copy of the zoo ONNX (same bytes, same fingerprint): ModelOpt's
    quantize() rewrites the file it reads (see test_quantize_leaves_its_input_untouched)."""
    m = m or zoo["m"]
    onnx_in = Path(tempfile.mkdtemp(dir=workspace)) / zoo["onnx"].name
    shutil.copyfile(zoo["onnx"], onnx_in)
    calib = {"calibration": m["calibration"]["path"]} if prec in QUANTIZED else {}
    return {"onnx": onnx_in, **calib}


def _outputs(prec: str, out_dir: Path) -> dict:
    return {"onnx": out_dir / f"{prec}.onnx", "sidecar": out_dir / f"{prec}.json"}


def _run(zoo: dict, prec: str, out_dir: Path, workspace: Path, m: dict | None = None,
         inputs: dict | None = None) -> dict:
    """Run the precision stage through the real runner; return its sidecar."""
    return run_stage("precision", {"tiny": m or zoo["m"]}, "tiny",
                     inputs or _inputs(zoo, prec, workspace, m), _outputs(prec, out_dir),
                     workspace, precision=prec)


def _job(zoo: dict, prec: str, out_dir: Path, workspace: Path, m: dict | None = None,
         inputs: dict | None = None):
    return stage_job("precision", {"tiny": m or zoo["m"]}, "tiny",
                     inputs or _inputs(zoo, prec, workspace, m), _outputs(prec, out_dir),
                     workspace, precision=prec)


def _infer(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0].astype(np.float32).ravel()


@pytest.mark.parametrize("prec", ["fp32", "fp16", "bf16", "int8", "fp8"])
def test_variant_written_checked_and_typed(zoo, tmp_path, workspace, prec):
    # setup
    out = tmp_path / f"{prec}.onnx"
    inputs = _inputs(zoo, prec, workspace)
    hashes = {role: sha256_file(path) for role, path in inputs.items()}

    # execute
    returned = _run(zoo, prec, tmp_path, workspace, inputs=inputs)

    # assert
    onnx.checker.check_model(str(out))
    sidecar = read_json(tmp_path / f"{prec}.json")
    assert sidecar["stage"] == "precision" and sidecar["model"] == "tiny"
    assert returned["fingerprint"] == sidecar["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{64}", sidecar["fingerprint"])
    config = precision.settings(zoo["m"], {"model": "tiny", "precision": prec})
    assert {r: i["sha256"] for r, i in sidecar["inputs"].items()} == hashes
    assert sidecar["config"] == config.model_dump(mode="json")
    assert sidecar["fingerprint"] == fingerprint(hashes, sidecar["config"],
                                                 tool_versions("precision"))
    assert sidecar["outputs"]["onnx"]["sha256"] == sha256_file(out)
    assert sidecar["config"]["precision"] == prec
    result = PrecisionResult.model_validate(sidecar["result"])
    assert result.precision == prec
    assert result.method == precision.METHODS[prec]
    assert result.bytes == out.stat().st_size and result.time_s >= 0
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    dtypes = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert MARKERS[prec]["ops"] <= ops
    assert MARKERS[prec]["initializer"] in dtypes
    assert "warning" not in result.extra
    assert result.nodes == len(model.graph.node)
    assert result.cast == sum(n.op_type == "Cast" for n in model.graph.node)
    assert result.quantize_linear == sum(n.op_type == "QuantizeLinear"
                                         for n in model.graph.node)
    # only Q/DQ reads calibration data; AutoCast uses seeded random reference inputs
    assert ("calibration" in sidecar["inputs"]) == (prec in ("int8", "fp8"))
    assert (sidecar["config"]["inputs"] is not None) == (prec in ("int8", "fp8"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prec}.json", f"{prec}.onnx"]
    if prec == "fp32":
        assert sha256_file(out) == sha256_file(zoo["onnx"])
    if prec in ("int8", "fp8"):
        calib_size = zoo["m"]["precision"][prec]["calib_size"]  # 16 and 32, of 32 in the file
        assert result.extra["calibration_samples"] == calib_size
        assert sidecar["config"]["method"]["calib_size"] == calib_size
    if prec in ("fp16", "bf16"):
        assert result.extra["reference_data"] == "random"


@pytest.mark.parametrize("prec", ["fp16", "int8"])
def test_variant_agrees_with_fp32_on_ort_cpu(zoo, tmp_path, workspace, prec):
    # setup
    ref = _infer(zoo["onnx"], zoo["x"])

    # execute
    _run(zoo, prec, tmp_path, workspace)
    got = _infer(tmp_path / f"{prec}.onnx", zoo["x"])

    # assert
    cosine = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99, cosine


def test_autocast_keeps_excluded_op_types_in_fp32(zoo, tmp_path, workspace):
    # setup
    m = copy.deepcopy(zoo["m"])
    m["precision"]["fp16"]["op_types_to_exclude"] = ["Conv"]

    # execute
    side = _run(zoo, "fp16", tmp_path, workspace, m)

    # assert
    result = PrecisionResult.model_validate(side["result"])
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    conv_w = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert conv_w and all(types[w] == onnx.TensorProto.FLOAT for w in conv_w)
    assert result.extra["high_precision_nodes"] >= 2
    assert side["config"]["method"]["op_types_to_exclude"] == ["Conv"]


@pytest.mark.parametrize("prec", ["int8", "fp8"])
def test_calibration_missing_input_key_is_a_precision_error(zoo, tmp_path, workspace, prec):
    # setup
    np.savez(tmp_path / "bad.npz", image=np.zeros((32, 3, 16, 16), np.float32))
    m = copy.deepcopy(zoo["m"])
    m["calibration"]["path"] = str(tmp_path / "bad.npz")
    job = _job(zoo, prec, tmp_path, workspace, m)

    # execute
    with pytest.raises(PrecisionError) as info:
        precision.run(job)
    with pytest.raises(StageFailed) as failed:
        _run(zoo, prec, tmp_path, workspace, m)

    # assert
    text = str(info.value)
    assert "models.tiny.calibration.path" in text and "'input'" in text
    assert "\n" not in text and "Fix:" in text
    assert str(failed.value) == text  # the runner reports the same one line
    assert not (tmp_path / f"{prec}.onnx").exists()
    assert not (tmp_path / f"{prec}.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_too_few_calibration_samples_is_a_precision_error(zoo, tmp_path, workspace):
    # setup
    m = copy.deepcopy(zoo["m"])
    m["precision"]["int8"]["calib_size"] = 33
    job = _job(zoo, "int8", tmp_path, workspace, m)

    # execute
    with pytest.raises(PrecisionError, match=r"32 samples .* needs 33") as info:
        precision.run(job)

    # assert
    assert info.value.key == "models.tiny.calibration.path"
    assert "calib_size" in info.value.fix


def test_modelopt_failure_is_one_line_precision_error(zoo, tmp_path, workspace):
    # setup
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    job = _job(zoo, "fp16", tmp_path, workspace, inputs={"onnx": broken})

    # execute
    with pytest.raises(PrecisionError) as info:
        precision.run(job)

    # assert
    assert "ModelOpt autocast to fp16 failed" in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.key == "models.tiny.precision.fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


@pytest.mark.parametrize("setting, value", [("calib_size", 8), ("calibration_method", "entropy")])
def test_fingerprint_follows_quantize_settings(zoo, tmp_path, workspace, setting, value):
    # setup
    m = copy.deepcopy(zoo["m"])
    m["precision"]["int8"][setting] = value
    base = _run(zoo, "int8", tmp_path / "a", workspace)

    # execute
    again = _run(zoo, "int8", tmp_path / "b", workspace)
    changed = _run(zoo, "int8", tmp_path / "c", workspace, m)

    # assert
    assert again["fingerprint"] == base["fingerprint"]
    assert changed["fingerprint"] != base["fingerprint"]
    assert changed["config"]["method"][setting] == value
    assert base["config"]["method"][setting] == zoo["m"]["precision"]["int8"][setting] != value
    sha = {name: run["outputs"]["onnx"]["sha256"] for name, run in
           {"base": base, "again": again, "changed": changed}.items()}
    assert sha["again"] == sha["base"] != sha["changed"]  # deterministic; the setting acts


def test_quantize_leaves_its_input_untouched(zoo, tmp_path, workspace):
    # setup
    inputs = _inputs(zoo, "int8", workspace)
    before = sha256_file(inputs["onnx"])

    # execute
    side = _run(zoo, "int8", tmp_path, workspace, inputs=inputs)

    # assert
    assert side["inputs"]["onnx"]["sha256"] == before
    assert sha256_file(inputs["onnx"]) == before
