"""Export stage: ONNX + PyTorch reference + sidecar, dynamo first with recorded fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_stage, stage_job
from engineforge.errors import ExportError
from engineforge.results import ExportResult
from engineforge.runner import StageFailed
from engineforge.sidecar import fingerprint, read_json, sha256_file
from engineforge.stages import export
from engineforge.versions import tool_versions

# A real model the dynamo exporter cannot capture (data-dependent control flow) but the
# TorchScript exporter traces: the fallback runs for real, in the worker process.
BRANCHY = '''
import torch


class Net(torch.nn.Module):
    """Fully convolutional, [N,1,H,W] -> [N,2,H,W], with a data-dependent branch."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, img):
        y = self.conv(img)
        if y.mean() > -1e9:  # always true, but torch.export cannot guard on it
            return y
        return -y
'''


def _inputs(m: dict) -> dict:
    """The export rule's named inputs (workflow/rules/common.smk): the checkpoint file, the
    project's arch source, the evaluation and calibration data."""
    ckpt = m["checkpoint"]
    files = {"checkpoint": ckpt["path"]} if ckpt.get("path") else {}
    arch = export.arch_source(ckpt)
    files |= {"arch_source": arch} if arch else {}
    return files | {s: m[s]["path"] for s in ("evaluation", "calibration") if s in m}


def _outputs(out: Path) -> dict:
    return {"onnx": out / "model.onnx", "reference": out / "reference.npz",
            "sidecar": out / "export.json"}


def _run(models: dict, name: str, tmp: Path, out: str = "out") -> dict:
    """Run the export through the real runner; return its sidecar."""
    return run_stage("export", models, name, _inputs(models[name]), _outputs(tmp / out), tmp)


def _job(models: dict, name: str, tmp: Path, out: str = "out"):
    return stage_job("export", models, name, _inputs(models[name]), _outputs(tmp / out), tmp)


@pytest.mark.parametrize("model", ["tinycls", "tinyfcn"])
def test_export_matches_pytorch_at_every_profile_point(tiny_models, tiny_workspace, model):
    # setup
    m = tiny_models[model]
    inputs = _inputs(m)
    # execute
    side = _run(tiny_models, model, tiny_workspace)
    # assert
    result = ExportResult.model_validate(side["result"])
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert result.opset == m["opset"] and result.time_s >= 0
    path = tiny_workspace / "out/model.onnx"
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert result.outputs == [o.name for o in sess.get_outputs()]
    ckpt_path = Path(m["checkpoint"]["path"]) if m["checkpoint"].get("path") else None
    net = export.load_module(model, m["checkpoint"], ckpt_path)
    for profile in m["profiles"].values():
        for which in ("min", "opt", "max"):
            (name, s), = profile.items()
            x = np.random.default_rng(1).random(s[which], dtype=np.float32)
            (got,) = sess.run(None, {name: x})
            want = net(torch.from_numpy(x)).detach().numpy()
            np.testing.assert_allclose(got, want, atol=1e-5)
    ref = np.load(tiny_workspace / "out/reference.npz")
    assert {k.split(":")[0] for k in ref.files} >= {"in", "out"}
    assert side["inputs"].get("checkpoint", {}).get("sha256") in (
        None, sha256_file(tiny_workspace / "tinycls.pt"))
    assert side["inputs"]["arch_source"]["sha256"] == sha256_file(tiny_workspace / "tinynets.py")
    assert side["outputs"]["onnx"]["sha256"] == sha256_file(path)
    assert side["outputs"]["reference"]["sha256"] == sha256_file(
        tiny_workspace / "out/reference.npz")
    # the fingerprint covers the input files, the settings slice and the tool versions
    config = export.settings(m, {"model": model}).model_dump(mode="json")
    assert side["config"] == config
    assert side["fingerprint"] == fingerprint({r: sha256_file(p) for r, p in inputs.items()},
                                              config, tool_versions("export"))
    assert read_json(tiny_workspace / "out/export.json")["fingerprint"] == side["fingerprint"]
    assert sorted(p.name for p in (tiny_workspace / "out").iterdir()) == [
        "export.json", "model.onnx", "reference.npz"]  # published; no staging left


def test_classifier_reference_includes_labelled_evaluation(tiny_models, tiny_workspace):
    # execute
    _run(tiny_models, "tinycls", tiny_workspace)
    # assert
    ref = np.load(tiny_workspace / "out/reference.npz")
    evals = [k for k in ref.files if k.startswith("eval_out:")]
    assert len(evals) == 1 and ref[evals[0]].shape == (32, 5)


SHUFFLE = '''
import torch


class Net(torch.nn.Module):
    """ShuffleNet's unit in small: channel split (chunk), bias-free conv + BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(2)

    def forward(self, img):
        a, b = img.chunk(2, dim=1)
        return torch.cat([a, torch.relu(self.bn(self.conv(b)))], 1)
'''


def test_export_folds_sequences_and_batchnorm(tiny_models, tiny_workspace):
    """The dynamo exporter writes chunk as SplitToSequence/SequenceAt (ModelOpt's AutoCast
    failed on ShuffleNet's: 'dtype is unsupported for objects of type: list') and a missing
    conv bias as CastLike/Expand of the input, which stops BatchNorm folding; onnxsim folds
    neither. The exporter's optimizer folds both."""
    # setup
    (tiny_workspace / "shuffle.py").write_text(SHUFFLE)
    m = {k: v for k, v in tiny_models["tinyfcn"].items() if k != "calibration"}
    m |= {"inputs": {"img": {"shape": ["batch", 4, "h", "w"]}},
          "checkpoint": {"kind": "state_dict", "arch": "shuffle:Net", "seed": 1}}
    m["profiles"] = {"p": {"img": {"min": [1, 4, 8, 8], "opt": [1, 4, 16, 16],
                                   "max": [2, 4, 16, 16]}}}
    # execute
    side = _run({"tinyfcn": m}, "tinyfcn", tiny_workspace)
    # assert: exported with dynamo, nothing left that only runtimes fold
    assert side["result"]["exporter"] == "dynamo"
    onnx_path = tiny_workspace / "out/model.onnx"
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert "Conv" in ops and "Split" in ops
    assert not ops & {"SplitToSequence", "SequenceAt", "CastLike", "BatchNormalization"}
    # assert: AutoCast makes its fp16 variant
    fp16 = run_stage("precision", {"tinyfcn": m}, "tinyfcn", {"onnx": onnx_path},
                     {"onnx": tiny_workspace / "fp16/model.onnx",
                      "sidecar": tiny_workspace / "fp16/precision.json"}, tiny_workspace,
                     precision="fp16")
    assert fp16["result"]["precision"] == "fp16"


def test_fallback_to_torchscript_is_recorded(tiny_models, tiny_workspace):
    # setup: a model the dynamo exporter rejects (a data-dependent branch)
    (tiny_workspace / "branchy.py").write_text(BRANCHY)
    m = dict(tiny_models["tinyfcn"],
             checkpoint={"kind": "state_dict", "arch": "branchy:Net", "seed": 1})
    # execute
    side = _run({"tinyfcn": m}, "tinyfcn", tiny_workspace)
    # assert
    result = ExportResult.model_validate(side["result"])
    assert result.exporter == "torchscript"
    assert result.fallback_reason.startswith("dynamo exporter failed: ")
    assert "data-dependent" in result.fallback_reason  # the cause, not the boilerplate
    assert "\x1b" not in result.fallback_reason
    assert "\n" not in result.fallback_reason
    assert "arch_source" in side["inputs"]  # editing branchy.py re-exports
    dims = [d.dim_param for d in onnx.load(str(tiny_workspace / "out/model.onnx"))
            .graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3]  # batch, h, w stay dynamic


def test_wrong_weights_name_model_key_and_fix(tiny_models, tiny_workspace):
    # setup: a state_dict of another architecture
    torch.save(torch.nn.Linear(2, 2).state_dict(), tiny_workspace / "tinycls.pt")
    job = _job(tiny_models, "tinycls", tiny_workspace)
    # execute
    with pytest.raises(ExportError) as info:
        export.run(job)
    with pytest.raises(StageFailed) as failed:
        _run(tiny_models, "tinycls", tiny_workspace)
    # assert
    msg = str(info.value)
    assert "model=tinycls" in msg and "key=models.tinycls.checkpoint.path" in msg
    assert "Fix: pair the weights with the arch" in msg
    assert str(failed.value) == " ".join(msg.split())  # the runner: the same, on one line
    out = tiny_workspace / "out"
    assert not (out / "model.onnx").exists()  # nothing half-written
    assert not (out / "export.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_bad_arch_import(tiny_models, tiny_workspace):
    # setup
    m = dict(tiny_models["tinyfcn"], checkpoint={"kind": "state_dict", "arch": "nope:Net"})
    job = _job({"tinyfcn": m}, "tinyfcn", tiny_workspace)
    # execute / assert
    with pytest.raises(ExportError, match="cannot import arch 'nope:Net'") as info:
        export.run(job)
    assert info.value.key == "models.tinyfcn.checkpoint.arch"


def test_onnx_checkpoint_skips_export(tiny_models, tiny_workspace):
    # setup: export once, then feed the ONNX back as the checkpoint
    _run(tiny_models, "tinyfcn", tiny_workspace)
    (tiny_workspace / "given.onnx").write_bytes((tiny_workspace / "out/model.onnx").read_bytes())
    m = dict(tiny_models["tinyfcn"], checkpoint={"kind": "onnx", "path": "given.onnx"})
    # execute
    side = _run({"tinyfcn": m}, "tinyfcn", tiny_workspace, out="o2")
    # assert
    assert side["result"]["exporter"].startswith("none")
    assert side["result"]["reference"].startswith("onnxruntime")
    assert sha256_file(tiny_workspace / "o2/model.onnx") == sha256_file(
        tiny_workspace / "given.onnx")
    assert side["inputs"]["checkpoint"]["sha256"] == sha256_file(tiny_workspace / "given.onnx")
    assert "arch_source" not in side["inputs"]
    ref = np.load(tiny_workspace / "o2/reference.npz")
    assert {k.split(":")[0] for k in ref.files} >= {"in", "out"}


def test_export_example_never_has_a_dynamic_dim_of_size_one():
    """torch.export specialises a dim whose example size is 1 (torch 2.11 then keeps a
    program that only runs batch 1): named dims of size 1 are repeated to 2, static ones
    and larger ones are left alone."""
    inputs = {"x": {"shape": ["batch", 1, "h", 8]}, "y": {"shape": ["batch", 3]}}
    feed = {"x": np.arange(1 * 1 * 4 * 8, dtype=np.float32).reshape(1, 1, 4, 8),
            "y": np.ones((5, 3), np.float32)}
    ex = export.export_example(feed, inputs)
    assert ex["x"].shape == (2, 1, 4, 8)       # batch 1 -> 2; static 1 kept; h=4 kept
    np.testing.assert_array_equal(ex["x"][0], ex["x"][1])
    np.testing.assert_array_equal(ex["x"][:1], feed["x"])
    assert ex["y"] is feed["y"]                 # nothing to change: the same array



def test_exporter_cause_keeps_a_summary_that_spans_lines():
    """torch.onnx's "## Exception summary" can put the message on the lines after the class
    (a Conv1d stride on a dynamic length did: the recorded cause was 'NotImplementedError:')."""
    err = RuntimeError("Failed to export the model with torch.export.\n## Exception summary\n\n"
                       "<class 'NotImplementedError'>: \nThe inequality, Eq((((x/16)//4)) - 62,"
                       " 0), cannot be solved using\nsolve_univariate_inequality.\n\n(Refer to "
                       "the full stack trace above for more information.)\n")
    assert export._exporter_cause(err) == (
        "NotImplementedError: The inequality, Eq((((x/16)//4)) - 62, 0), cannot be solved "
        "using solve_univariate_inequality.")
