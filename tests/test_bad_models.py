"""Bad and odd checkpoints through the export stage: every bad one is one ExportError line
naming model, key and fix (no traceback, no colour codes, never torch's advice to load
unsafely); every odd but valid one exports, and its reference matches the ONNX one to one.

The stage runs in-process (``export.run`` on a conftest ``stage_job``) for speed; a few cases
go through the real runner (``run_stage``: staging, worker process, sidecar)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import bad_models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FIXTURES, run_stage, stage_job, tiny_raw_config
from engineforge import config, modelio
from engineforge.errors import BenchError, ExportError, ProfileError
from engineforge.results import ExportResult
from engineforge.runner import StageFailed, run_job
from engineforge.stages import baseline, export, profiles

FCN_INPUTS = {"img": {"shape": ["batch", 1, "h", "w"]}}
CLS_INPUTS = {"x": {"shape": ["batch", 3, 8, 8]}}
CLS_PROFILE = {"b1-8": {"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}}}


@pytest.fixture
def ws(tiny_workspace):
    shutil.copy(FIXTURES / "bad_models.py", tiny_workspace / "bad_models.py")
    return tiny_workspace


def _models(ws: Path, checkpoint: dict, inputs: dict, profiles: dict, **extra) -> dict:
    """One model 'odd' resolved like a user's config (defaults of the tiny test config)."""
    raw = tiny_raw_config()
    raw["models"] = {"odd": {"checkpoint": checkpoint, "inputs": inputs,
                             "profiles": profiles, **extra}}
    return config.resolve(raw, ws)["models"]


def _arch(name: str, **extra) -> dict:
    return {"kind": "state_dict", "arch": f"bad_models:{name}", "seed": 0, **extra}


def _files(ws: Path, models: dict) -> tuple[dict, dict]:
    ckpt = models["odd"]["checkpoint"]
    inputs = {"checkpoint": ckpt["path"]} if ckpt.get("path") else {}
    arch = export.arch_source(ckpt)
    inputs |= {"arch_source": arch} if arch else {}
    out = ws / "out"
    return inputs, {"onnx": out / "model.onnx", "reference": out / "reference.npz",
                    "sidecar": out / "export.json"}


def _job(ws: Path, models: dict):
    inputs, outputs = _files(ws, models)
    (ws / "out").mkdir(exist_ok=True)
    return stage_job("export", models, "odd", inputs, outputs, ws)


def _fails(ws: Path, models: dict, key: str) -> str:
    """Run the stage in-process; it must raise one ExportError line naming model and key."""
    with pytest.raises(ExportError) as info:
        export.run(_job(ws, models))
    err, msg = info.value, str(info.value)
    assert err.model == "odd" and msg.startswith("[model=odd stage=export key=")
    assert err.key == key, msg
    assert err.fix and f" Fix: {err.fix}" in msg
    assert "\n" not in msg and "\x1b" not in msg and "Traceback" not in msg
    assert "weights_only=False" not in msg and "likely succeed" not in msg
    return err.message


def _profile_check(ws: Path, models: dict, profile: str):
    """Export through the real runner (it succeeds), then the profiles stage's job."""
    inputs, outputs = _files(ws, models)
    run_stage("export", models, "odd", inputs, outputs, ws)
    return stage_job("profiles", models, "odd", {"onnx": outputs["onnx"]},
                     {"sidecar": ws / "out" / "profiles" / f"{profile}.json"}, ws,
                     profile=profile)


def _profile_fails(ws: Path, models: dict, profile: str) -> str:
    """The exported ONNX cannot take one of the profile's shapes: one ProfileError line."""
    with pytest.raises(ProfileError) as info:
        profiles.run(_profile_check(ws, models, profile))
    err, msg = info.value, str(info.value)
    assert msg.startswith(f"[model=odd stage=profiles key=models.odd.profiles.{profile}] ")
    assert err.fix and f" Fix: {err.fix}" in msg
    assert "\n" not in msg and "Traceback" not in msg
    return err.message


def _exports_and_matches(ws: Path, models: dict, shapes: dict) -> list[str]:
    """Through the real runner; then the ONNX, the reference and PyTorch agree one to one
    (reference inputs, and ``shapes``: not the export example's). Returns output names."""
    inputs, outputs = _files(ws, models)
    side = run_stage("export", models, "odd", inputs, outputs, ws)
    m = models["odd"]
    sess = ort.InferenceSession(str(outputs["onnx"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert ExportResult.model_validate(side["result"]).outputs == names
    ref = np.load(outputs["reference"])
    assert sorted(k[4:] for k in ref.files if k.startswith("out:")) == sorted(names)
    got = sess.run(names, {n: ref[f"in:{n}"] for n in m["inputs"]})
    for name, g in zip(names, got):
        np.testing.assert_allclose(g, ref[f"out:{name}"], rtol=1e-4, atol=1e-5)
    net = export.load_module("odd", m["checkpoint"], None)
    feed = modelio.sample_inputs(m["inputs"], shapes, seed=3)
    with torch.inference_mode():
        want = export._flat_outputs(net(*(torch.from_numpy(feed[n]) for n in m["inputs"])))
    got = sess.run(names, feed)
    assert len(got) == len(want) == len(names)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)
    return names


# -- the exporter gets it wrong -----------------------------------------------------------------
def test_custom_autograd_function_that_loses_the_input(ws):
    # setup: dynamo fails on the Function; the TorchScript fallback folds it into a constant
    models = _models(ws, _arch("CustomFunctionNet"), FCN_INPUTS, {"p": {"img": {
        "min": [1, 1, 8, 8], "opt": [1, 1, 16, 16], "max": [2, 1, 16, 16]}}})
    # execute
    msg = _fails(ws, models, "models.odd.inputs")
    # assert
    assert msg.startswith("the exported ONNX lost declared input(s) ['img'] (its inputs: none)")
    assert "torch.autograd.Function" in msg
    assert not (ws / "out/model.onnx.data").exists()


def _unused_input_models(ws: Path, **extra) -> dict:
    inputs = {"x": {"shape": ["batch", 4]}, "mask": {"shape": ["batch", 4]}}
    return _models(ws, _arch("UnusedInput"), inputs, {"p": {
        "x": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]},
        "mask": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}}, **extra)


def test_unused_input_dropped_by_the_torchscript_exporter(ws):
    # setup: forward(x, mask) never reads mask; the TorchScript exporter drops it
    models = _unused_input_models(ws, export={"exporter": "torchscript"})
    # execute
    msg = _fails(ws, models, "models.odd.inputs")
    # assert
    assert msg.startswith("the exported ONNX lost declared input(s) ['mask'] (its inputs: "
                          "['x'])")


def test_unused_input_kept_by_dynamo(ws):
    # the positive control: dynamo keeps the unused input, and the export is good
    models = _unused_input_models(ws)
    _exports_and_matches(ws, models, {"x": [3, 4], "mask": [3, 4]})
    sess = ort.InferenceSession(str(ws / "out/model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "mask"]


def test_named_dim_the_model_cannot_vary(ws):
    # setup: a Linear over w: the dynamo export makes w static
    models = _models(ws, _arch("FixedWidth"), FCN_INPUTS, {"p": {"img": {
        "min": [1, 1, 8, 16], "opt": [1, 1, 16, 16], "max": [2, 1, 32, 16]}}})
    # execute
    msg = _fails(ws, models, "models.odd.inputs.img.shape")
    # assert
    assert msg.startswith("input 'img' dim 3 ('w') is fixed at 16 in the export")


def test_profile_shape_the_model_cannot_take(ws):
    # setup: a hard-coded 16x16 reshape; the first profile fits, the second's max does not
    models = _models(ws, _arch("FlattenHead"), FCN_INPUTS, {
        "fits": {"img": {"min": [1, 1, 16, 16], "opt": [1, 1, 16, 16], "max": [4, 1, 16, 16]}},
        "wide": {"img": {"min": [1, 1, 16, 16], "opt": [1, 1, 16, 16], "max": [1, 1, 16, 32]}}})
    # execute
    msg = _profile_fails(ws, models, "wide")
    fits = profiles.run(_profile_check(ws, models, "fits"))  # control: the first one runs
    # assert: the exporter's optimizer folded the reshape to [-1, 512], so the wide shape
    # runs, with a batch of 2 for 1: the output contradicts the graph's own 'batch'
    assert msg == ("profile 'wide' max shape (img=[1, 1, 16, 32]: batch=1, h=16, w=32) runs, "
                   "but output 'linear' dim 0 ('batch') is 2, not the input's 1: the graph "
                   "only holds for the export's shapes (a reshape to hard-coded sizes?)")
    assert fits.checked == ["min", "max"]  # opt equals min: run once


def test_sequence_longer_than_learned_positions(ws):
    # setup: int64 tokens; 16 learned positions, the profile asks for 32
    inputs = {"ids": {"dtype": "int64", "shape": ["batch", "seq"], "range": [0, 99]}}
    models = _models(ws, _arch("PositionalTokens"), inputs, {"tokens": {"ids": {
        "min": [1, 4], "opt": [2, 16], "max": [2, 32]}}})
    # execute
    msg = _profile_fails(ws, models, "tokens")
    # assert
    assert msg.startswith("profile 'tokens' max shape fails in ONNX Runtime (ids=[2, 32]: "
                          "batch=2, seq=32): Add node ")
    assert "broadcast" in msg


def test_torchscript_neither_exporter_handles_leads_with_the_operator(ws):
    # setup: a traced eval-mode transformer layer (fused op)
    bad_models.traced_transformer().save(str(ws / "tr.pt"))
    models = _models(ws, {"kind": "torchscript", "path": "tr.pt"},
                     {"x": {"shape": ["batch", 4, 8]}},
                     {"p": {"x": {"min": [1, 4, 8], "opt": [2, 4, 8], "max": [4, 4, 8]}}})
    # execute
    msg = _fails(ws, models, "models.odd.export")
    # assert
    assert msg.startswith("unsupported operator aten::_transformer_encoder_layer_fwd: "
                          "torchscript exporter: UnsupportedOperatorError: Exporting the "
                          "operator 'aten::_transformer_encoder_layer_fwd'")


def test_dynamo_message_without_colour_codes(ws):
    # setup: dynamo only (no fallback) on a ScriptModule: torch's message has ANSI codes
    bad_models.traced_transformer().save(str(ws / "tr.pt"))
    models = _models(ws, {"kind": "torchscript", "path": "tr.pt"},
                     {"x": {"shape": ["batch", 4, 8]}},
                     {"p": {"x": {"min": [1, 4, 8], "opt": [2, 4, 8], "max": [4, 4, 8]}}},
                     export={"fallback": False})
    # execute
    msg = _fails(ws, models, "models.odd.export")
    # assert: the exception summary, not torch's "step 1/3" boilerplate
    assert msg == ("export failed: dynamo exporter: ValueError: Exporting a ScriptModule is "
                   "not supported. Maybe try converting your ScriptModule to an ExportedProgram "
                   "using `TS2EPConverter(mod, args, kwargs).convert()` instead.")


# -- .pt2 shapes ------------------------------------------------------------------------------
def _save_program(ws: Path, name: str, batch: int, dynamic_shapes=None) -> None:
    torch.manual_seed(0)
    net = bad_models.TupleHead().eval()
    program = torch.export.export(net, (torch.rand(batch, 3, 8, 8),),
                                  dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(ws / name))


def test_static_pt2_with_a_batch_profile(ws):
    # setup: exported with a fixed batch of 1
    _save_program(ws, "static.pt2", 1)
    models = _models(ws, {"kind": "exported_program", "path": "static.pt2"}, CLS_INPUTS,
                     CLS_PROFILE)
    # execute
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    # assert
    assert msg == ("'static.pt2' was exported with input 'x' dim 0 (batch) fixed at 1, but "
                   "profile 'b1-8' opt shape needs batch=4")
    with pytest.raises(ExportError) as info:
        export.run(_job(ws, models))
    assert ("dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1, max=8)}}"
            in info.value.fix)


def test_static_pt2_in_the_pytorch_baseline(ws):
    # setup: the eager baseline bench loads the same .pt2 (not through the export)
    _save_program(ws, "static.pt2", 1)
    models = _models(ws, {"kind": "exported_program", "path": "static.pt2"}, CLS_INPUTS,
                     CLS_PROFILE)
    job = stage_job("baseline", models, "odd", {"checkpoint": "static.pt2"},
                    {"result": ws / "b.json"}, ws, profile="b1-8")
    # execute
    with pytest.raises(BenchError) as info:
        baseline.run(job)
    # assert: the same line as the export's, not "Guard failed: x.size()[0] == 1"
    assert info.value.message == ("'static.pt2' was exported with input 'x' dim 0 (batch) "
                                  "fixed at 1, but profile 'b1-8' opt shape needs batch=4")
    assert info.value.key == "models.odd.checkpoint.path"


def test_pt2_range_narrower_than_the_profile(ws):
    # setup: batch dynamic in [1, 4]; the profile needs 8
    _save_program(ws, "narrow.pt2", 2, ({0: torch.export.Dim("batch", min=1, max=4)},))
    models = _models(ws, {"kind": "exported_program", "path": "narrow.pt2"}, CLS_INPUTS,
                     CLS_PROFILE)
    # execute
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    # assert
    assert msg.endswith("input 'x' dim 0 (batch) in [1, 4], but profile 'b1-8' max shape "
                        "needs batch=8")


def test_dynamic_pt2_exports(ws):
    # setup: the positive control of the two above
    _save_program(ws, "dyn.pt2", 2, ({0: torch.export.Dim("batch", min=1, max=8)},))
    models = _models(ws, {"kind": "exported_program", "path": "dyn.pt2"}, CLS_INPUTS,
                     CLS_PROFILE)
    # execute
    inputs, outputs = _files(ws, models)
    side = run_stage("export", models, "odd", inputs, outputs, ws)
    # assert
    assert side["result"]["exporter"] == "dynamo"
    sess = ort.InferenceSession(str(outputs["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [["batch", 3, 8, 8]]
    assert len(sess.get_outputs()) == 3


# -- unreadable and unsafe checkpoint files ------------------------------------------------------
class _Payload:
    """Unpickling runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_carrying_pickle_is_refused_and_not_run(ws):
    # setup: a torch.save zip and a raw pickle, each running `touch` when unpickled
    marker = ws / "PWNED"
    torch.save({"weight": _Payload(marker)}, ws / "evil.pt")
    (ws / "raw.pt").write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    for name in ("evil.pt", "raw.pt"):
        models = _models(ws, _arch("TupleHead", path=name), CLS_INPUTS, CLS_PROFILE)
        # execute
        msg = _fails(ws, models, "models.odd.checkpoint.path")
        # assert
        assert msg == (f"checkpoint '{name}' holds pickled Python objects or code "
                       "(posix.system), not just weights: refused for safety (weights-only "
                       "loading; nothing in it was run)")
        assert not marker.exists()
    # positive control: the payload is live (plain pickle runs it)
    pickle.loads((ws / "raw.pt").read_bytes())
    assert marker.exists()


def test_code_carrying_pickle_through_the_runner(ws):
    # setup
    marker = ws / "PWNED"
    torch.save({"weight": _Payload(marker)}, ws / "evil.pt")
    models = _models(ws, _arch("TupleHead", path="evil.pt"), CLS_INPUTS, CLS_PROFILE)
    inputs, outputs = _files(ws, models)
    # execute
    with pytest.raises(StageFailed) as info:
        run_stage("export", models, "odd", inputs, outputs, ws)
    # assert: one line; torch's own text, less its unsafe advice, in the job log
    line = str(info.value)
    assert line.startswith("[model=odd stage=export key=models.odd.checkpoint.path] "
                           "checkpoint 'evil.pt' holds pickled Python objects or code")
    assert "\n" not in line and "weights_only=False" not in line
    assert not marker.exists() and not (ws / "out/model.onnx").exists()
    log = (ws / "logs/export.log").read_text()
    assert "Weights only load failed" in log and "posix.system" in log
    assert "`weights_only` set to `False`" not in log and "likely succeed" not in log


def test_pickled_full_module_is_refused(ws):
    # setup: torch.save(model) instead of torch.save(model.state_dict())
    torch.save(bad_models.TupleHead(), ws / "full.pt")
    models = _models(ws, _arch("TupleHead", path="full.pt"), CLS_INPUTS, CLS_PROFILE)
    # execute
    with pytest.raises(ExportError) as info:
        export.run(_job(ws, models))
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    # assert
    assert msg.startswith("checkpoint 'full.pt' holds pickled Python objects or code "
                          "(bad_models.TupleHead")
    assert "torch.save(model.state_dict(), 'model.pt')" in info.value.fix
    assert "safetensors" in info.value.fix


@pytest.mark.parametrize("content, found", [
    (np.random.default_rng(7).bytes(4096),
     "not a checkpoint of this kind (unknown format: corrupt or random bytes)"),
    (b"", "the file is empty"),
    ("truncated", "a zip archive that is truncated or corrupt"),
    ("list", None),
])
def test_unreadable_state_dict(ws, content, found):
    # setup
    if content == "truncated":
        torch.manual_seed(0)
        torch.save(bad_models.TupleHead().state_dict(), ws / "w.pt")
        content = (ws / "w.pt").read_bytes()[:-200]
    if content == "list":
        torch.save([torch.zeros(2)], ws / "w.pt")
    else:
        (ws / "w.pt").write_bytes(content)
    models = _models(ws, _arch("TupleHead", path="w.pt"), CLS_INPUTS, CLS_PROFILE)
    # execute
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    # assert
    assert msg == (f"cannot read state_dict 'w.pt': {found}" if found else
                   "checkpoint 'w.pt' holds a list, not a state_dict (parameter names to "
                   "tensors)")


def test_random_bytes_safetensors(ws):
    (ws / "w.safetensors").write_bytes(np.random.default_rng(7).bytes(4096))
    models = _models(ws, _arch("TupleHead", path="w.safetensors"), CLS_INPUTS, CLS_PROFILE)
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    assert msg == ("cannot read state_dict 'w.safetensors': not a checkpoint of this kind "
                   "(unknown format: corrupt or random bytes)")


def test_training_checkpoint_without_weights(ws):
    # setup: {"epoch", "optimizer"}, no weights under a known key
    torch.save({"epoch": 3, "best_acc": 0.9}, ws / "w.pt")
    models = _models(ws, _arch("TupleHead", path="w.pt"), CLS_INPUTS, CLS_PROFILE)
    # execute
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    # assert
    assert msg == ("checkpoint 'w.pt' holds entries that are not tensors (epoch, best_acc), "
                   "not a state_dict")


def test_training_checkpoint_with_dataparallel_weights(ws):
    # setup: what real training scripts save: weights under "model", keys "module.*"
    torch.manual_seed(5)
    net = bad_models.TupleHead().eval()
    weights = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": weights, "epoch": 3}, ws / "w.pt")
    models = _models(ws, _arch("TupleHead", path="w.pt"), CLS_INPUTS, CLS_PROFILE)
    # execute
    export.run(_job(ws, models))
    # assert: the trained weights, not the arch's initial ones
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    sess = ort.InferenceSession(str(ws / "out/model.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = net(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, fix", [("torchscript", "torch.jit.save"),
                                       ("exported_program", "torch.export.save")])
def test_random_bytes_torchscript_and_pt2(ws, kind, fix):
    # setup
    (ws / "m.bin").write_bytes(np.random.default_rng(7).bytes(4096))
    models = _models(ws, {"kind": kind, "path": "m.bin"}, CLS_INPUTS, CLS_PROFILE)
    # execute
    with pytest.raises(ExportError) as info:
        export.run(_job(ws, models))
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    # assert
    assert msg.startswith(f"cannot load {kind} checkpoint 'm.bin': not a checkpoint of this "
                          "kind (unknown format: corrupt or random bytes); ")
    assert fix in info.value.fix


def _good_onnx(ws: Path) -> None:
    """out/model.onnx of a good export (input 'x')."""
    export.run(_job(ws, _models(ws, _arch("TupleHead"), CLS_INPUTS, CLS_PROFILE)))


def test_truncated_onnx_checkpoint(ws):
    # setup: a good ONNX, cut in half
    _good_onnx(ws)
    data = (ws / "out/model.onnx").read_bytes()
    (ws / "cut.onnx").write_bytes(data[: len(data) // 2])
    models = _models(ws, {"kind": "onnx", "path": "cut.onnx"}, CLS_INPUTS,
                     {"p": {"x": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8],
                                  "max": [1, 3, 8, 8]}}})
    # execute
    msg = _fails(ws, models, "models.odd.checkpoint.path")
    # assert
    assert msg.startswith("ONNX checkpoint 'cut.onnx' is not a readable ONNX model: ")
    assert "DecodeError" in msg


def test_onnx_checkpoint_with_other_input_names(ws):
    # setup: a good ONNX whose input is 'x'; the config says 'image'
    _good_onnx(ws)
    shutil.copy(ws / "out/model.onnx", ws / "given.onnx")
    models = _models(ws, {"kind": "onnx", "path": "given.onnx"},
                     {"image": {"shape": ["batch", 3, 8, 8]}},
                     {"p": {"image": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8],
                                      "max": [1, 3, 8, 8]}}})
    # execute
    msg = _fails(ws, models, "models.odd.inputs")
    # assert
    assert msg == "the ONNX checkpoint's inputs are ['x'], the config declares ['image']"


# -- odd but valid ------------------------------------------------------------------------------
def test_several_inputs_and_outputs(ws):
    inputs = {"img": {"shape": ["batch", 3, 8, 8]},
              "scale": {"shape": ["batch", 1], "range": [0.5, 2.0]}}
    models = _models(ws, _arch("TwoInTwoOut"), inputs, {"p": {
        "img": {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]},
        "scale": {"min": [1, 1], "opt": [2, 1], "max": [4, 1]}}})
    names = _exports_and_matches(ws, models, {"img": [3, 3, 8, 8], "scale": [3, 1]})
    assert len(names) == 2


def test_int64_token_inputs(ws):
    inputs = {"ids": {"dtype": "int64", "shape": ["batch", "seq"], "range": [0, 99]}}
    models = _models(ws, _arch("TokenClassifier"), inputs, {"p": {"ids": {
        "min": [1, 4], "opt": [2, 16], "max": [4, 32]}}})
    _exports_and_matches(ws, models, {"ids": [3, 7]})
    proto = onnx.load(str(ws / "out/model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_dict_outputs_named_by_their_keys(ws):
    models = _models(ws, _arch("DictHead"), CLS_INPUTS, CLS_PROFILE)
    assert _exports_and_matches(ws, models, {"x": [3, 3, 8, 8]}) == ["logits", "embedding"]


def test_nested_dict_outputs(ws):
    models = _models(ws, _arch("NestedDictHead"), CLS_INPUTS, CLS_PROFILE)
    assert _exports_and_matches(ws, models, {"x": [3, 3, 8, 8]}) == [
        "heads.0", "heads.1", "embedding"]


def test_dict_outputs_with_the_torchscript_exporter(ws):
    models = _models(ws, _arch("DictHead"), CLS_INPUTS, CLS_PROFILE,
                     export={"exporter": "torchscript"})
    assert _exports_and_matches(ws, models, {"x": [3, 3, 8, 8]}) == ["logits", "embedding"]


def test_tuple_outputs(ws):
    models = _models(ws, _arch("TupleHead"), CLS_INPUTS, CLS_PROFILE)
    assert len(_exports_and_matches(ws, models, {"x": [3, 3, 8, 8]})) == 3


def test_large_weights_go_to_external_data(ws, monkeypatch):
    # setup: the 2 GiB case without 2 GiB: the threshold is lowered to 0 bytes
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    models = _models(ws, _arch("TupleHead"), CLS_INPUTS, CLS_PROFILE)
    # execute
    result = export.run(_job(ws, models))
    # assert: weights beside the ONNX (the runner publishes them with it), and it runs
    proto = onnx.load(str(ws / "out/model.onnx"), load_external_data=False)
    stored = {t.name: t.data_location for t in proto.graph.initializer}
    assert stored["conv.weight"] == onnx.TensorProto.EXTERNAL, stored
    assert (ws / "out/model.onnx.data").stat().st_size > 0
    sess = ort.InferenceSession(str(ws / "out/model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == result.outputs
    ref = np.load(ws / "out/reference.npz")
    for name, got in zip(result.outputs, sess.run(None, {"x": ref["in:x"]})):
        np.testing.assert_allclose(got, ref[f"out:{name}"], rtol=1e-4, atol=1e-5)


def test_integer_outputs(ws):
    models = _models(ws, _arch("ArgmaxHead"), CLS_INPUTS, CLS_PROFILE)
    _exports_and_matches(ws, models, {"x": [3, 3, 8, 8]})
    sess = ort.InferenceSession(str(ws / "out/model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(int64)"]


def test_torchscript_checkpoint_skips_dynamo(ws):
    # setup: a scripted module (torch.export never takes one)
    torch.manual_seed(0)
    torch.jit.script(bad_models.TupleHead().eval()).save(str(ws / "ts.pt"))
    models = _models(ws, {"kind": "torchscript", "path": "ts.pt"}, CLS_INPUTS, CLS_PROFILE)
    # execute
    result = export.run(_job(ws, models))
    # assert
    assert result.exporter == "torchscript"
    assert result.fallback_reason == "dynamo exporter skipped: it cannot export a ScriptModule"
    assert len(result.outputs) == 3


def test_failed_profile_check_publishes_nothing(ws):
    # setup: the export itself succeeds; the profile check fails afterwards
    models = _models(ws, _arch("FlattenHead"), FCN_INPUTS, {"wide": {"img": {
        "min": [1, 1, 16, 16], "opt": [1, 1, 16, 16], "max": [1, 1, 16, 32]}}})
    job = _profile_check(ws, models, "wide")
    # execute
    with pytest.raises(StageFailed, match=r"profile 'wide' max shape \(img="):
        run_job(job)
    # assert: no sidecar vouches for the profile; the export's own outputs stay published
    assert not job.outputs["sidecar"].exists()
    assert not [p for p in job.outputs["sidecar"].parent.iterdir()
                if p.name.startswith(".staging-")]
    assert (ws / "out" / "model.onnx").is_file()
