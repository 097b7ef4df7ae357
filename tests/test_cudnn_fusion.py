"""engineforge.cudnn_fusion: BatchNorm folding and the conv(+add)+ReLU rewrite into cuDNN's
fused ops, on a torch.export module.

cuDNN's fused ops have no CPU kernel and CI has no GPU: the ``cpu_kernels`` fixture registers
CPU stand-ins for the two ATen ops (conv2d, add, relu: what cuDNN computes) — a mock at a true
boundary, the GPU library. Everything else (folding, pattern matching, fake kernels,
re-export with a dynamic batch) is the real code."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from engineforge import cudnn_fusion


@pytest.fixture(scope="module")
def cpu_kernels():
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("cudnn_convolution_relu",
             lambda x, w, b, s, p, d, g: F.relu(F.conv2d(x, w, b, s, p, d, g)), "CPU")
    lib.impl("cudnn_convolution_add_relu",
             lambda x, w, z, a, b, s, p, d, g: F.relu(F.conv2d(x, w, b, s, p, d, g)
                                                       + (1 if a is None else a) * z), "CPU")
    yield
    lib._destroy()


class Net(torch.nn.Module):
    """A stem (conv-BN-ReLU), a residual block (z + conv, in place and not), a BN-only
    downsample, a conv read twice (not fusable) and a transposed conv (not fusable)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem, self.bn0 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), \
            torch.nn.BatchNorm2d(8)
        self.c1, self.bn1 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.bn2 = torch.nn.Conv2d(8, 16, 1, bias=False), torch.nn.BatchNorm2d(16)
        self.down, self.bnd = torch.nn.Conv2d(8, 16, 1, stride=1, bias=False), \
            torch.nn.BatchNorm2d(16)
        self.twice = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 4, 2, stride=2)
        for bn in (self.bn0, self.bn1, self.bn2, self.bnd):  # statistics a fold must use
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.data.uniform_(0.5, 1.5, generator=g)
            bn.bias.data.uniform_(-0.2, 0.2, generator=g)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.c1(x)))
        y = self.bn2(self.c2(y))
        y += self.bnd(self.down(x))           # conv + z, in place
        y = torch.relu_(y)
        t = self.twice(y)                     # read twice: stays a plain convolution
        y = F.relu(t) + t
        z = F.relu(x.repeat(1, 2, 1, 1) + self.down(x))   # z + conv
        return self.up(y + z)


def _exported(batch_max: int = 8, core_aten: bool = False):
    """The net, an input, its exported module (``core_aten``: decomposed to core ATen, where
    BatchNorm is ``_native_batch_norm_legit_no_training`` + getitem) and dynamic shapes."""
    net = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    dyn = ({0: torch.export.Dim("batch", min=1, max=batch_max)},)
    program = torch.export.export(net, (x,), dynamic_shapes=dyn)
    if core_aten:
        program = program.run_decompositions()
    return net, x, program.module(), dyn


def _ops(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("core_aten", [False, True])
def test_rewrites_what_cudnn_can_fuse_and_leaves_the_rest(cpu_kernels, core_aten):
    # setup
    net, x, gm, _ = _exported(core_aten=core_aten)
    with torch.no_grad():
        ref = net(x)
    # execute
    counts = cudnn_fusion.fuse(gm)
    # assert: every BN after a conv folded; stem + c1 conv-relu; the two residual relus
    assert counts == {"batch_norms_folded": 4, "conv_relu": 2, "conv_add_relu": 2,
                      "channels_last_weights": 6}  # 4 folded, down (2nd use), twice
    ops = _ops(gm)
    assert ops["aten.cudnn_convolution_relu.default"] == 2
    assert ops["aten.cudnn_convolution_add_relu.default"] == 2
    assert not any("batch_norm" in op for op in ops)
    # left plain: 'twice' and the folded downsample (the residual z of the in-place add),
    # and the transposed convolution (core ATen writes it as a transposed `convolution`)
    transposed = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default
                  and n.args[6]]
    assert ops["aten.convolution.default"] + ops["aten.conv2d.default"] - len(transposed) == 2
    assert ops["aten.conv_transpose2d.input"] + len(transposed) == 1
    # the same function (BN statistics included), at another batch too
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-5)
        x5 = torch.randn(5, 3, 12, 12)
        torch.testing.assert_close(gm(x5), net(x5), rtol=1e-4, atol=1e-5)


def test_fused_module_re_exports_with_the_dynamic_batch(cpu_kernels):
    """The backend re-exports the rewritten module (fake kernels trace the fused ops)."""
    net, x, gm, dyn = _exported()
    cudnn_fusion.fuse(gm)
    program = torch.export.export(gm, (x,), dynamic_shapes=dyn)
    ops = _ops(program.graph_module)
    assert ops["aten.cudnn_convolution_relu.default"] == 2
    # channels_last from the stem on, though the input is NCHW (the weights decide)
    fused = [n for n in program.graph.nodes if "cudnn_convolution" in str(n.target)]
    assert fused and all(n.meta["val"].is_contiguous(memory_format=torch.channels_last)
                         and not n.meta["val"].is_contiguous() for n in fused)
    x7 = torch.randn(7, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x7), net(x7), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fake_kernels_give_the_shape_and_layout_cudnn_returns(layout):
    """ATen's cuDNN path returns channels_last when the input or weight is; inductor plans
    its buffers on the fake kernel's strides, so they must agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cudnn_fusion.register_fake_kernels()
    with FakeTensorMode():
        x = torch.empty(2, 8, 15, 15).contiguous(memory_format=layout)
        w = torch.empty(16, 8, 3, 3)
        z = torch.empty(2, 16, 8, 8)
        out = torch.ops.aten.cudnn_convolution_relu(x, w, None, [2, 2], [1, 1], [1, 1], 1)
        out2 = torch.ops.aten.cudnn_convolution_add_relu(x, w, z, 1.0, None, [2, 2], [1, 1],
                                                         [1, 1], 1)
    for o in (out, out2):
        assert tuple(o.shape) == (2, 16, 8, 8)
        assert o.is_contiguous(memory_format=layout)


class ViewsNCHW(torch.nn.Module):
    """conv-BN-ReLU, then ``view`` of its output: valid for NCHW strides only."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.bn(self.conv(x)))))
        return self.fc(y.view(y.shape[0], -1))


def test_a_model_viewing_nchw_outputs_is_fused_without_channels_last(cpu_kernels, tmp_path):
    """The H100 run's digits_cnn: channels_last weights make its view fail when the backend
    re-exports; the build then fuses without the layout change and records why."""
    from types import SimpleNamespace

    from engineforge.backends import torch_inductor as ti

    # setup: the export stage's program of a model that views a conv output
    net, x = ViewsNCHW().eval(), torch.randn(2, 1, 4, 4)
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)),
                      tmp_path / "model.pt2")
    req = SimpleNamespace(program=tmp_path / "model.pt2", precision="fp32")
    # the layout change alone is what breaks it (positive control for the retry)
    gm = torch.export.load(str(tmp_path / "model.pt2")).module()
    cudnn_fusion.fuse(gm)
    with pytest.raises(Exception, match="view"):
        torch.export.export(gm, (x,), dynamic_shapes=({0: batch},))
    # execute
    program, fused = ti._export_cast(req, "cpu", (x,), (({0: batch},),), fusion=True)
    # assert: fused, NCHW, the cause kept; the program computes the model
    assert fused["conv_relu"] == 2 and fused["channels_last_weights"] == 0
    assert "view" in fused["channels_last_error"]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), net(x), rtol=1e-4, atol=1e-5)


def test_builds_fuse_only_low_precision_engines_on_a_gpu():
    """fp32 engines keep fp32 convolutions (cuDNN's fused kernels run them as TF32)."""
    from engineforge.backends.torch_inductor import fuses

    assert fuses({}, "fp16", "cuda") and fuses({"cudnn_fusion": True}, "bf16", "cuda")
    assert not fuses({}, "fp32", "cuda")
    assert not fuses({}, "fp16", "cpu")
    assert not fuses({"cudnn_fusion": False}, "fp16", "cuda")
