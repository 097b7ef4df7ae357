"""Convolution epilogues fused into cuDNN, for the torch-inductor backend on a GPU.

Inductor runs each convolution through cuDNN (on the H100 cuDNN beat every Triton template)
and its epilogue (bias, residual add, ReLU) as a separate Triton kernel that reads and writes
the whole activation once more. cuDNN runs conv + bias (+ add) + ReLU as one kernel: ATen's
``cudnn_convolution_relu`` and ``cudnn_convolution_add_relu``, the ops TorchScript's
``optimize_for_inference`` rewrites to on CUDA. :func:`fuse` does that rewrite on a
``torch.export`` module's graph:

1. a BatchNorm (inference) right after a convolution is folded into the convolution's weight
   and bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``), in the weights' own dtype;
2. conv → relu becomes ``cudnn_convolution_relu``; conv → add(·, z) → relu becomes
   ``cudnn_convolution_add_relu`` (z of the conv's shape);
3. every convolution weight goes channels_last, so cuDNN runs channels_last (its fast
   layout) from the first convolution on. Inductor does not choose that layout itself when
   a dim is dynamic (its layout optimisation is off then: pytorch/pytorch#102670); on the
   H100 resnet50 fp16 b32 ran at 3.35 ms from a dynamic-batch package without this step.

Only 2-D, non-transposed convolutions whose output has no other reader are rewritten.
(Zero-padding resnet50's 3-channel stem to 8, as TensorRT does, was measured too: cuDNN then
picked a slower stem kernel, 1.285 vs 1.202 ms for the whole model.) ATen
has no fake (meta) kernel for the two ops: :func:`register_fake_kernels` adds one (shape and
memory format as ATen's cuDNN path picks them), so torch.export and inductor trace them;
inductor calls them as extern kernels, AOTInductor through its proxy executor.
"""

from __future__ import annotations

import functools
import operator

FUSED_RELU = "aten::cudnn_convolution_relu"
FUSED_ADD_RELU = "aten::cudnn_convolution_add_relu"


@functools.cache
def register_fake_kernels() -> None:
    import torch

    def out_like(x, w, stride, padding, dilation):
        size = [x.shape[0], w.shape[0]] + [
            (x.shape[i + 2] + 2 * padding[i] - dilation[i] * (w.shape[i + 2] - 1) - 1)
            // stride[i] + 1 for i in range(x.dim() - 2)]
        cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        fmt = (cl if (torch._prims_common.suggest_memory_format(x) == cl
                      or torch._prims_common.suggest_memory_format(w) == cl)
               else torch.contiguous_format)
        return x.new_empty(size).contiguous(memory_format=fmt)

    @torch.library.register_fake(FUSED_RELU)
    def _conv_relu(x, w, bias, stride, padding, dilation, groups):
        return out_like(x, w, stride, padding, dilation)

    @torch.library.register_fake(FUSED_ADD_RELU)
    def _conv_add_relu(x, w, z, alpha, bias, stride, padding, dilation, groups):
        return out_like(x, w, stride, padding, dilation)


def _args(node, gm) -> dict | None:
    norm = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    return dict(norm.kwargs) if norm else None


def _conv(node, gm, min_kernel: int = 1) -> dict | None:
    """The convolution's arguments when it is one this pass can fuse (a kernel of at least
    ``min_kernel`` in some spatial dim), else None."""
    import torch

    aten = torch.ops.aten
    if node.op != "call_function" or node.target not in (aten.conv2d.default,
                                                         aten.convolution.default):
        return None
    a = _args(node, gm)
    if a is None or a.get("transposed") or any(a.get("output_padding") or []):
        return None
    w = a["weight"].meta.get("val") if hasattr(a["weight"], "meta") else None
    if w is None or w.dim() != 4 or max(w.shape[2:]) < min_kernel:
        return None
    return {"input": a["input"], "weight": a["weight"], "bias": a.get("bias"),
            "stride": list(a.get("stride", [1, 1])), "padding": list(a.get("padding", [0, 0])),
            "dilation": list(a.get("dilation", [1, 1])), "groups": a.get("groups", 1)}


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fold_batch_norms(gm, min_kernel: int) -> int:
    """Fold each inference BatchNorm whose input is a fusable convolution read by it alone."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    aten = torch.ops.aten
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in (
                aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            continue
        a = _args(bn, gm)
        if a is None or a.get("training"):
            continue
        conv = a["input"]
        spec = _conv(conv, gm, min_kernel)
        if spec is None or _only_user(conv) is not bn:
            continue
        params = [spec["weight"], spec["bias"], a["weight"], a["bias"], a["running_mean"],
                  a["running_var"]]
        if any(p is not None and getattr(p, "op", None) != "get_attr" for p in params) or \
                any(p is None for p in params[4:]):
            continue
        out = bn if bn.target == aten.batch_norm.default else _only_user(bn)
        if out is not bn and (out is None or out.target is not operator.getitem
                              or out.args[1] != 0):
            continue  # the tuple form's statistics outputs are read too
        w, b, gamma, beta, mean, var = (_attr(gm, p) for p in params)
        fw, fb = fuse_conv_bn_weights(w, b, mean, var, a["eps"], gamma, beta)
        names = []
        for kind, t in (("weight", fw), ("bias", fb)):
            name = f"_cudnn_fused_{folded}_{kind}"
            gm.register_buffer(name, t.detach().to(w.dtype))
            names.append(name)
        with gm.graph.inserting_before(conv):
            wn, bnode = (gm.graph.get_attr(n) for n in names)
        wn.meta["val"], bnode.meta["val"] = spec["weight"].meta["val"], None
        new_conv = _rebuild_conv(gm, conv, spec, wn, bnode)
        out.replace_all_uses_with(new_conv)
        for dead in ([out, bn] if out is not bn else [bn]) + [conv]:
            gm.graph.erase_node(dead)
        folded += 1
    return folded


def _owner(gm, target: str):
    """(the module holding a get_attr target, the attribute's name)."""
    owner, _, leaf = target.rpartition(".")
    return gm.get_submodule(owner), leaf


def _attr(gm, node):
    return None if node is None else getattr(*_owner(gm, node.target))


def _rebuild_conv(gm, old, spec, weight, bias):
    import torch

    with gm.graph.inserting_after(old):
        new = gm.graph.call_function(torch.ops.aten.convolution.default, (
            spec["input"], weight, bias, spec["stride"], spec["padding"], spec["dilation"],
            False, [0, 0], spec["groups"]))
    new.meta = dict(old.meta)
    return new


def _fuse_relus(gm, min_kernel: int) -> tuple[int, int]:
    """conv → relu and conv → add → relu into the cuDNN ops; (conv+relu, conv+add+relu)."""
    import torch

    aten = torch.ops.aten
    relu_ops = (aten.relu.default, aten.relu_.default)
    add_ops = (aten.add.Tensor, aten.add_.Tensor)
    counts = [0, 0]
    for relu in list(gm.graph.nodes):
        if relu.op != "call_function" or relu.target not in relu_ops:
            continue
        src = relu.args[0]
        spec = _conv(src, gm, min_kernel)
        if spec is not None and _only_user(src) is relu:
            new = _call(gm, relu, FUSED_RELU, (spec["input"], spec["weight"], spec["bias"],
                                               spec["stride"], spec["padding"],
                                               spec["dilation"], spec["groups"]))
            _replace(gm, relu, new, [src])
            counts[0] += 1
            continue
        if getattr(src, "target", None) not in add_ops or _only_user(src) is not relu:
            continue
        lhs, rhs = src.args[:2]
        alpha = src.kwargs.get("alpha", 1)
        for conv, z in ((lhs, rhs), (rhs, lhs)):
            spec = _conv(conv, gm, min_kernel)
            if spec is None or _only_user(conv) is not src:
                continue
            if (conv is rhs and (alpha != 1 or src.target is aten.add_.Tensor)) or \
                    _shape(conv) is None or _shape(conv) != _shape(z):
                continue
            new = _call(gm, relu, FUSED_ADD_RELU, (
                spec["input"], spec["weight"], z, alpha if conv is lhs else 1, spec["bias"],
                spec["stride"], spec["padding"], spec["dilation"], spec["groups"]))
            _replace(gm, relu, new, [src, conv])
            counts[1] += 1
            break
    return counts[0], counts[1]


def _shape(node):
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(val.shape) if val is not None and hasattr(val, "shape") else None


def _call(gm, at, op_name: str, args: tuple):
    import torch

    op = getattr(torch.ops.aten, op_name.split("::")[1]).default
    with gm.graph.inserting_before(at):
        new = gm.graph.call_function(op, args)
    new.meta = dict(at.meta)
    return new


def _replace(gm, old, new, dead: list) -> None:
    old.replace_all_uses_with(new)
    for node in [old, *dead]:
        gm.graph.erase_node(node)


def _channels_last_weights(gm) -> int:
    """Every 2-D convolution weight (plain or fused) in channels_last: cuDNN then runs the
    convolutions channels_last (its fast fp16/bf16 layout) and hands that layout on."""
    import torch

    aten = torch.ops.aten
    fused = (aten.cudnn_convolution_relu.default, aten.cudnn_convolution_add_relu.default)
    done = set()
    for node in gm.graph.nodes:
        spec = _conv(node, gm)  # a plain 2-D convolution (not transposed)
        if spec is None and not (node.op == "call_function" and node.target in fused):
            continue
        weight = spec["weight"] if spec else node.args[1]
        if getattr(weight, "op", None) != "get_attr" or weight.target in done:
            continue
        module, leaf = _owner(gm, weight.target)
        t = getattr(module, leaf)
        if t.dim() != 4:
            continue
        if isinstance(t, torch.nn.Parameter):
            t.data = t.data.contiguous(memory_format=torch.channels_last)
        else:
            setattr(module, leaf, t.contiguous(memory_format=torch.channels_last))
        done.add(weight.target)
    return len(done)


def fuse(gm, channels_last: bool = True, min_kernel: int = 1) -> dict:
    """Rewrite ``gm`` (an exported program's ``.module()``) in place; returns the counts
    {batch_norms_folded, conv_relu, conv_add_relu, channels_last_weights}. Tensors then
    really are channels_last: a ``view`` of a convolution's output that needs NCHW strides
    fails when the module is traced again (the caller retries with ``channels_last=False``).
    ``min_kernel``: fuse only convolutions with a kernel that large (2: leave 1x1 ones to
    inductor as matmuls with its own epilogues; on the H100 that was slower, resnet50 fp16
    b32 1.44 ms, 1.58 autotuned, vs 1.21: benchmarks/bench_gpu.py's ablation only)."""
    register_fake_kernels()
    folded = _fold_batch_norms(gm, min_kernel)
    conv_relu, conv_add_relu = _fuse_relus(gm, min_kernel)
    channels_last = _channels_last_weights(gm) if channels_last else 0
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return {"batch_norms_folded": folded, "conv_relu": conv_relu,
            "conv_add_relu": conv_add_relu, "channels_last_weights": channels_last}
