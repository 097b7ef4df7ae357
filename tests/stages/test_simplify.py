"""Simplify stage: onnxsim result or the kept input, with the reason and node counts."""

from __future__ import annotations

import onnx
import onnxsim
from engineforge.sidecar import sha256_file
from engineforge.stages import export, simplify


def _exported(m, name, tmp):
    export.run(name, m, tmp / "e/model.onnx", tmp / "e/ref.npz", tmp / "e/export.json", root=tmp)
    return tmp / "e/model.onnx"


def test_simplify_records_node_counts(tiny_models, tiny_workspace):
    # setup
    src = _exported(tiny_models["tinyfcn"], "tinyfcn", tiny_workspace)
    # execute
    side = simplify.run("tinyfcn", tiny_models["tinyfcn"], src, tiny_workspace / "s/model.onnx",
                        tiny_workspace / "s/simplify.json")
    # assert
    r = side["result"]
    assert r["nodes_after"] <= r["nodes_before"]
    assert r["nodes_after"] == len(onnx.load(str(tiny_workspace / "s/model.onnx")).graph.node)
    assert (r["simplified"], r["kept_reason"]) in ((True, None), (False, r["kept_reason"]))


def test_onnxsim_failure_keeps_input(tiny_models, tiny_workspace, monkeypatch):
    # setup
    src = _exported(tiny_models["tinyfcn"], "tinyfcn", tiny_workspace)

    def boom(*a, **k):
        raise RuntimeError("shape inference exploded")

    monkeypatch.setattr(onnxsim, "simplify", boom)
    # execute
    side = simplify.run("tinyfcn", tiny_models["tinyfcn"], src, tiny_workspace / "s/model.onnx",
                        tiny_workspace / "s/simplify.json")
    # assert
    assert side["result"]["simplified"] is False
    assert "shape inference exploded" in side["result"]["kept_reason"]
    assert sha256_file(src) == sha256_file(tiny_workspace / "s/model.onnx")


def test_growth_is_rejected(tiny_models, tiny_workspace, monkeypatch):
    # setup: onnxsim "succeeds" but returns a larger graph
    src = _exported(tiny_models["tinyfcn"], "tinyfcn", tiny_workspace)
    model = onnx.load(str(src))

    def grow(m, **k):
        bigger = onnx.ModelProto()
        bigger.CopyFrom(m)
        out = bigger.graph.output[0].name
        bigger.graph.node.append(onnx.helper.make_node("Identity", [out], ["extra"]))
        return bigger, True

    monkeypatch.setattr(onnxsim, "simplify", grow)
    # execute
    side = simplify.run("tinyfcn", tiny_models["tinyfcn"], src, tiny_workspace / "s/model.onnx",
                        tiny_workspace / "s/simplify.json")
    # assert
    assert "grew the graph" in side["result"]["kept_reason"]
    assert side["result"]["nodes_after"] == len(model.graph.node)
