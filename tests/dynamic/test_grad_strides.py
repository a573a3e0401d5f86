"""Every parameter's gradient has the parameter's own strides, for every operator and PEDConv path, 1x1 and 3x3
kernels, NCHW and channels_last: DDP's gradient buckets take the parameter's strides, and a gradient laid out
otherwise is copied every step with "UserWarning: Grad strides do not match bucket view strides" on every rank
(the 1x1 downsample convs of ResNet-18 on PEDConv's patch_gemm path did, in NCHW runs).

NCHW: the operators' backwards themselves return the parameter's strides. channels_last: a 1x1 kernel's strides
are ambiguous (the size-1 dimensions), torch's own convolution backward and the operators' matrix products pick
different ones, so main.py's DDP set-up registers :func:`align_gradient_strides`, tested here as it runs there."""

from __future__ import annotations

import pytest
import torch

from image_classification.dynamic import build_conv, list_operators
from image_classification.dynamic.pedconv.paths import PATH_REGISTRY
from image_classification.models import to_channels_last
from image_classification.training.distributed import align_gradient_strides

SPECS = [f"pedconv:path={p}" for p in sorted(PATH_REGISTRY) if p != "triton"]  # triton: CUDA or the interpreter
SPECS += [op if op != "involution" else "involution:group_channels=4" for op in list_operators() if op != "pedconv"]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1)], ids=["1x1", "1x1_s2", "3x3"])
@pytest.mark.parametrize("spec", SPECS)
def test_every_gradient_has_its_parameters_strides(spec: str, kernel: int, stride: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = build_conv(spec, 8, 16, kernel, stride=stride, padding=kernel // 2, bias=False).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        to_channels_last(conv)  # as main.py --memory-format nhwc lays out the parameters
        align_gradient_strides(conv)  # as main.py wraps a model in DDP
    x = torch.randn(3, 8, 6, 6).contiguous(memory_format=fmt)
    conv(x).float().square().mean().backward()
    wrong = [(name, tuple(p.stride()), tuple(p.grad.stride())) for name, p in conv.named_parameters()
             if p.grad is not None and p.grad.stride() != p.stride()]
    assert not wrong, f"(parameter, its strides, its gradient's strides): {wrong}"


def test_to_channels_last_lays_out_every_4d_tensor_and_leaves_kernel_banks() -> None:
    """main.py --memory-format nhwc: 1x1 kernels get channels_last strides (model.to(memory_format=...) leaves them
    NCHW-strided), and the 5-D kernel banks of DY-Conv/CondConv/ODConv, which model.to refuses, stay as they are."""
    for spec in ("static", "dyconv", "condconv", "odconv"):
        conv = build_conv(spec, 8, 16, 1)
        to_channels_last(conv)
        for name, tensor in conv.named_parameters():
            if tensor.dim() == 4:
                assert tensor.stride() == (8, 1, 8, 8), (spec, name, tensor.stride())
            elif tensor.dim() == 5:
                assert tensor.is_contiguous(), (spec, name)
    x = torch.randn(2, 8, 5, 5)
    torch.manual_seed(0)
    plain = build_conv("condconv", 8, 16, 3, padding=1)
    laid_out = to_channels_last(build_conv("condconv", 8, 16, 3, padding=1))
    laid_out.load_state_dict(plain.state_dict())
    torch.testing.assert_close(laid_out(x.contiguous(memory_format=torch.channels_last)), plain(x))


class _HandsBack(torch.autograd.Function):
    """Identity whose backward hands back a prepared gradient as it is (strides included)."""

    @staticmethod
    def forward(ctx, param, grad):
        ctx.grad = grad
        return param.sum()

    @staticmethod
    def backward(ctx, _):
        grad, ctx.grad = ctx.grad, None  # the only reference: autograd may keep it as the .grad (no copy)
        return grad, None


@pytest.mark.parametrize("hooked", [True, False])
def test_the_hook_re_describes_a_gradient_that_differs_in_size1_strides_only(hooked: bool) -> None:
    """A gradient of another memory layout is copied into the parameter's by autograd itself (its layout contract);
    one that differs only in the strides of size-1 dimensions is kept as it is unless the hook re-describes it."""
    param = torch.nn.Parameter(torch.randn(6, 4, 1, 1))  # strides (4, 1, 1, 1)
    model = torch.nn.Module()
    model.w = param
    if hooked:
        assert align_gradient_strides(model) == 1
    values = torch.randn(6, 4, 1, 1)
    _HandsBack.apply(param, torch.empty_strided((6, 4, 1, 1), (4, 1, 4, 4)).copy_(values)).backward()
    assert torch.equal(param.grad, values)  # the values never change
    assert (param.grad.stride() == param.stride()) is hooked
