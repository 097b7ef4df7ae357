"""Simplify stage: onnxsim result or the kept input, with the reason and node counts."""

from __future__ import annotations

from pathlib import Path

import onnx
from conftest import run_stage
from engineforge.results import SimplifyResult
from engineforge.sidecar import sha256_file
from engineforge.stages import export, simplify
from onnx import TensorProto, helper


def _exported(models, name, tmp) -> Path:
    m = models[name]
    inputs = {s: m[s]["path"] for s in ("evaluation", "calibration") if s in m}
    arch = export.arch_source(m["checkpoint"])  # the export rule's inputs (tinyfcn: seeded)
    inputs |= {"arch_source": arch} if arch else {}
    run_stage("export", models, name, inputs,
              {"onnx": tmp / "e/model.onnx", "reference": tmp / "e/ref.npz",
               "sidecar": tmp / "e/export.json"}, tmp)
    return tmp / "e/model.onnx"


def _simplify(models, name, src: Path, tmp) -> dict:
    return run_stage("simplify", models, name, {"onnx": src},
                     {"onnx": tmp / "s/model.onnx", "sidecar": tmp / "s/simplify.json"}, tmp)


def _io():
    return (helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 1, "h", "w"]),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1, "h", "w"]))


def _custom_op_model(path: Path) -> Path:
    """Valid ONNX (the checker skips unknown domains) that ONNX Runtime cannot load, so
    onnxsim's own check raises."""
    x, y = _io()
    graph = helper.make_graph([helper.make_node("Relu", ["img"], ["r"]),
                               helper.make_node("Foo", ["r"], ["out"], domain="com.example")],
                              "custom", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("com.example", 1)]),
              str(path))
    return path


def _constant_if_model(path: Path) -> Path:
    """One If node on a constant condition: onnxsim inlines its 4-node branch, so the
    top-level graph grows from 1 to 4 nodes."""
    x, y = _io()
    then = helper.make_graph(
        [helper.make_node("Relu", ["img"], ["t1"]), helper.make_node("Neg", ["t1"], ["t2"]),
         helper.make_node("Abs", ["t2"], ["t3"]), helper.make_node("Sigmoid", ["t3"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["img"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["out"], then_branch=then,
                                                else_branch=other)],
                              "constant_if", [x], [y], initializer=[cond])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_simplify_records_node_counts(tiny_models, tiny_workspace):
    # setup
    src = _exported(tiny_models, "tinyfcn", tiny_workspace)
    # execute
    side = _simplify(tiny_models, "tinyfcn", src, tiny_workspace)
    # assert
    r = SimplifyResult.model_validate(side["result"])
    out = tiny_workspace / "s/model.onnx"
    kept = onnx.load(str(out))
    assert r.nodes_after <= r.nodes_before == len(onnx.load(str(src)).graph.node)
    assert r.nodes_after == len(kept.graph.node)
    assert r.ops_after == simplify.op_counts(kept)
    assert (r.simplified, r.kept_reason) in ((True, None), (False, r.kept_reason))
    assert side["inputs"]["onnx"]["sha256"] == sha256_file(src)
    assert side["outputs"]["onnx"]["sha256"] == sha256_file(out)
    assert side["config"] == {"enabled": True, "test_shapes": {"img": [1, 1, 16, 16]}}


def test_onnxsim_failure_keeps_input(tiny_models, tiny_workspace):
    # setup: a graph onnxsim cannot check (ONNX Runtime has no kernel for its op)
    src = _custom_op_model(tiny_workspace / "custom.onnx")
    # execute
    side = _simplify(tiny_models, "tinyfcn", src, tiny_workspace)
    # assert
    assert side["result"]["simplified"] is False
    assert side["result"]["kept_reason"].startswith("onnxsim failed: ")
    assert "com.example:Foo" in side["result"]["kept_reason"]
    assert sha256_file(src) == sha256_file(tiny_workspace / "s/model.onnx")
    assert side["result"]["nodes_after"] == side["result"]["nodes_before"] == 2


def test_growth_is_rejected(tiny_models, tiny_workspace):
    # setup: onnxsim succeeds but returns a larger top-level graph
    src = _constant_if_model(tiny_workspace / "if.onnx")
    model = onnx.load(str(src))
    # execute
    side = _simplify(tiny_models, "tinyfcn", src, tiny_workspace)
    # assert
    assert "grew the graph (1 -> 4 nodes)" in side["result"]["kept_reason"]
    assert side["result"]["simplified"] is False
    assert side["result"]["nodes_after"] == len(model.graph.node)
    assert side["result"]["ops_after"] == {"If": 1}
    assert sha256_file(src) == sha256_file(tiny_workspace / "s/model.onnx")
