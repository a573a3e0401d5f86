"""Every registered operator trains under autocast (fp16 and bf16; CPU autocast, and CUDA where available):
forward, backward, finite gradients; and its eval forward (batch 1 and batch > 1 paths) runs under it too.

``--amp`` wraps the forward in ``torch.autocast``; an operator that mixes a low-precision conv output
with float32 generator tensors in an in-place op fails on its first step (DCD's ``baddbmm_`` did).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from image_classification.dynamic import build_conv, infomax_loss, list_operators

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _TinyNet(nn.Module):
    """3x3, strided 3x3 (with bias), 1x1 and depthwise operator convs, BatchNorm, a classifier."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.conv1 = build_conv(op, 16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = build_conv(op, 16, 32, 3, stride=2, padding=1, bias=True)
        self.conv3 = build_conv(op, 32, 32, 1, bias=False)
        try:  # a depthwise layer where the operator has one (DCD's depthwise form, PEDConv's grouped path)
            self.dw: nn.Module = build_conv(op, 32, 32, 3, padding=1, groups=32, bias=False)
        except ValueError:
            self.dw = nn.Identity()
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = self.dw(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


# every registered operator, plus the variants that take other code paths
SPECS = [*list_operators(), "dcd:mode=joint", "pedconv:sampling=learned,rank=2"]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("op", SPECS)
def test_operator_trains_under_autocast(op: str, dtype: str, device: str) -> None:
    torch.manual_seed(0)
    net = _TinyNet(op).train().to(device)
    x = torch.randn(4, 16, 8, 8, device=device)
    target = torch.tensor([0, 1, 2, 0], device=device)
    with torch.autocast(device, dtype=DTYPES[dtype]):
        out = net(x)
        loss = nn.functional.cross_entropy(out.float(), target)
    term = infomax_loss(net)
    if term is not None:
        loss = loss + 1e-3 * term.float()
    assert torch.isfinite(loss), loss
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters() if p.requires_grad}
    missing = [name for name, g in grads.items() if g is None and "infomax" not in name]
    assert len(missing) < len(grads), f"{op}: no parameter received a gradient"
    bad = [name for name, g in grads.items() if g is not None and not torch.isfinite(g).all()]
    assert not bad, f"{op} {dtype}: non-finite gradients in {bad}"
    assert all(g.dtype == torch.float32 for g in grads.values() if g is not None)  # master weights stay fp32
    net.eval()
    with torch.no_grad(), torch.autocast(device, dtype=DTYPES[dtype]):
        for batch in (1, 3):
            y = net(torch.randn(batch, 16, 8, 8, device=device))
            assert y.shape == (batch, 3) and torch.isfinite(y.float()).all(), (op, dtype, batch)
