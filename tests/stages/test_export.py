"""Export stage: ONNX + PyTorch reference + sidecar, dynamo first with recorded fallback."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from engineforge.errors import ExportError
from engineforge.sidecar import read_json, sha256_file
from engineforge.stages import export


def _run(m, name, tmp):
    return export.run(name, m, tmp / "out/model.onnx", tmp / "out/reference.npz",
                      tmp / "out/export.json", root=tmp)


@pytest.mark.parametrize("model", ["tinycls", "tinyfcn"])
def test_export_matches_pytorch_at_every_profile_point(tiny_models, tiny_workspace, model):
    # setup
    m = tiny_models[model]
    # execute
    side = _run(m, model, tiny_workspace)
    # assert
    assert side["result"]["exporter"] == "dynamo" and side["result"]["fallback_reason"] is None
    path = tiny_workspace / "out/model.onnx"
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net = export.load_module(model, m, tiny_workspace)
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
    assert read_json(tiny_workspace / "out/export.json")["fingerprint"] == side["fingerprint"]


def test_classifier_reference_includes_labelled_evaluation(tiny_models, tiny_workspace):
    # execute
    _run(tiny_models["tinycls"], "tinycls", tiny_workspace)
    # assert
    ref = np.load(tiny_workspace / "out/reference.npz")
    evals = [k for k in ref.files if k.startswith("eval_out:")]
    assert len(evals) == 1 and ref[evals[0]].shape == (32, 5)


def test_fallback_to_torchscript_is_recorded(tiny_models, tiny_workspace, monkeypatch):
    # setup: make the dynamo exporter fail the way an unsupported op does
    real = torch.onnx.export

    def flaky(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("Unsupported FX node: aten::weird")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", flaky)
    # execute
    side = _run(tiny_models["tinyfcn"], "tinyfcn", tiny_workspace)
    # assert
    assert side["result"]["exporter"] == "torchscript"
    assert "aten::weird" in side["result"]["fallback_reason"]
    dims = [d.dim_param for d in onnx.load(str(tiny_workspace / "out/model.onnx"))
            .graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3]  # batch, h, w stay dynamic


def test_wrong_weights_name_model_key_and_fix(tiny_models, tiny_workspace):
    # setup: a state_dict of another architecture
    torch.save(torch.nn.Linear(2, 2).state_dict(), tiny_workspace / "tinycls.pt")
    # execute
    with pytest.raises(ExportError) as info:
        _run(tiny_models["tinycls"], "tinycls", tiny_workspace)
    # assert
    msg = str(info.value)
    assert "model=tinycls" in msg and "key=models.tinycls.checkpoint.path" in msg
    assert not (tiny_workspace / "out/model.onnx").exists()  # nothing half-written


def test_bad_arch_import(tiny_models, tiny_workspace):
    m = dict(tiny_models["tinyfcn"], checkpoint={"kind": "state_dict", "arch": "nope:Net"})
    with pytest.raises(ExportError, match="cannot import arch 'nope:Net'"):
        _run(m, "tinyfcn", tiny_workspace)


def test_onnx_checkpoint_skips_export(tiny_models, tiny_workspace):
    # setup: export once, then feed the ONNX back as the checkpoint
    _run(tiny_models["tinyfcn"], "tinyfcn", tiny_workspace)
    (tiny_workspace / "given.onnx").write_bytes((tiny_workspace / "out/model.onnx").read_bytes())
    m = dict(tiny_models["tinyfcn"], checkpoint={"kind": "onnx", "path": "given.onnx"})
    # execute
    side = export.run("tinyfcn", m, tiny_workspace / "o2/model.onnx",
                      tiny_workspace / "o2/reference.npz", tiny_workspace / "o2/export.json",
                      root=tiny_workspace)
    # assert
    assert side["result"]["exporter"].startswith("none")
    assert sha256_file(tiny_workspace / "o2/model.onnx") == sha256_file(
        tiny_workspace / "given.onnx")
