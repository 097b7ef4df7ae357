"""Simplify stage: onnxsim result or the kept input, with the reason and node counts."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from conftest import run_stage
from engineforge.results import SimplifyResult
from engineforge.sidecar import sha256_file
from engineforge.stages import export, simplify
from onnx import TensorProto, helper, numpy_helper


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


def _foldable_model(path: Path) -> Path:
    """img + (c1 + c2): onnxsim folds the constant Add, 2 nodes -> 1."""
    x, y = _io()
    consts = [numpy_helper.from_array(np.array([v], np.float32), n)
              for n, v in (("c1", 1.0), ("c2", 2.0))]
    graph = helper.make_graph([helper.make_node("Add", ["c1", "c2"], ["c"]),
                               helper.make_node("Add", ["img", "c"], ["out"])],
                              "foldable", [x], [y], initializer=consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


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
    # Conv-ReLU-Conv has nothing to fold: onnxsim's result is used, with the same 3 nodes
    assert (r.simplified, r.kept_reason) == (True, None)
    assert r.nodes_after == r.nodes_before == len(onnx.load(str(src)).graph.node) == 3
    assert r.nodes_after == len(kept.graph.node)
    assert r.ops_after == simplify.op_counts(kept) == {"Conv": 2, "Relu": 1}
    assert side["inputs"]["onnx"]["sha256"] == sha256_file(src)
    assert side["outputs"]["onnx"]["sha256"] == sha256_file(out)
    assert side["config"] == {"enabled": True, "test_shapes": {"img": [1, 1, 16, 16]}}


def test_constant_folding_is_used(tiny_models, tiny_workspace):
    # setup
    src = _foldable_model(tiny_workspace / "fold.onnx")
    # execute
    side = _simplify(tiny_models, "tinyfcn", src, tiny_workspace)
    # assert
    r = SimplifyResult.model_validate(side["result"])
    out = tiny_workspace / "s/model.onnx"
    assert (r.simplified, r.kept_reason) == (True, None)
    assert (r.nodes_before, r.nodes_after) == (2, 1)
    assert r.ops_before == {"Add": 2} and r.ops_after == {"Add": 1}
    assert len(onnx.load(str(out)).graph.node) == 1
    assert sha256_file(out) != sha256_file(src)


def test_disabled_keeps_the_export(tiny_models, tiny_workspace):
    # setup
    src = _foldable_model(tiny_workspace / "fold.onnx")
    models = copy.deepcopy(tiny_models)
    models["tinyfcn"]["simplify"]["enabled"] = False
    # execute
    side = _simplify(models, "tinyfcn", src, tiny_workspace)
    # assert: onnxsim would fold it (test above), but the input is kept as is
    r = SimplifyResult.model_validate(side["result"])
    assert (r.simplified, r.kept_reason) == (False, "simplify.enabled is false")
    assert (r.nodes_before, r.nodes_after) == (2, 2)
    assert sha256_file(src) == sha256_file(tiny_workspace / "s/model.onnx")
    assert side["config"]["enabled"] is False


def test_onnxsim_failure_keeps_input(tiny_models, tiny_workspace):
    # setup: a graph onnxsim cannot check (ONNX Runtime has no kernel for its op)
    src = _custom_op_model(tiny_workspace / "custom.onnx")
    # execute
    side = _simplify(tiny_models, "tinyfcn", src, tiny_workspace)
    # assert
    assert side["result"]["simplified"] is False
    reason = side["result"]["kept_reason"]
    assert reason.startswith("onnxsim failed: Fail: [ONNXRuntimeError]")  # the error's type
    assert reason.endswith("com.example:Foo(-1) is not a registered function/op")
    assert sha256_file(src) == sha256_file(tiny_workspace / "s/model.onnx")
    assert side["result"]["nodes_after"] == side["result"]["nodes_before"] == 2


def test_growth_is_rejected(tiny_models, tiny_workspace):
    # setup: onnxsim succeeds but returns a larger top-level graph
    src = _constant_if_model(tiny_workspace / "if.onnx")
    model = onnx.load(str(src))
    # execute
    side = _simplify(tiny_models, "tinyfcn", src, tiny_workspace)
    # assert
    assert side["result"]["kept_reason"] == "onnxsim grew the graph (1 -> 4 nodes)"
    assert side["result"]["simplified"] is False
    assert side["result"]["nodes_after"] == len(model.graph.node)
    assert side["result"]["ops_after"] == {"If": 1}
    assert sha256_file(src) == sha256_file(tiny_workspace / "s/model.onnx")
