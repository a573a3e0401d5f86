"""Precise BatchNorm statistics against a plain float64 reference of their definition, and under DDP."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from script_runner import forkserver_context

from image_classification.dynamic import build_conv
from image_classification.training.precise_bn import batchnorm_layers, recompute_bn_statistics


class _Net(nn.Module):
    """PEDConv (training noise on by default) between BatchNorms, plus dropout: eval-mode parts must stay eval."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = build_conv("pedconv:reduction=4", 8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def _batches(n: int, seed: int = 0, size: int = 4) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=generator) * (1 + i) + i for i in range(n)]


def _reference(model: nn.Module, batches: List[torch.Tensor]) -> Dict[str, tuple]:
    """Definition: mean over batches of each BN input's per-batch channel mean / unbiased variance, the rest
    of the network in eval mode (no noise) and each BN normalising with its batch statistics (train mode)."""
    reference = copy.deepcopy(model).double().eval()
    bns = {name: m for name, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: Dict[str, List[torch.Tensor]] = {name: [] for name in bns}
    for name, bn in bns.items():
        bn.train()
        bn.register_forward_hook(lambda m, inputs, out, name=name: seen[name].append(inputs[0].detach()))
    with torch.no_grad():
        for x in batches:
            reference(x.double())
    result = {}
    for name, inputs in seen.items():
        means = torch.stack([t.mean(dim=(0, 2, 3)) for t in inputs])
        variances = torch.stack([t.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for t in inputs])
        result[name] = (means.mean(0), variances.mean(0))
    return result


def test_statistics_are_the_average_over_batches_without_noise() -> None:
    torch.manual_seed(0)
    model = _Net()
    model.train()
    model(torch.randn(4, 3, 6, 6))  # some EMA history that precise BN must replace, not blend
    batches = _batches(5)
    expected = _reference(model, batches)
    momentum_before = [bn.momentum for bn in batchnorm_layers(model)]
    tracked_before = [int(bn.num_batches_tracked) for bn in batchnorm_layers(model)]
    used = recompute_bn_statistics([model], [(x, torch.zeros(4)) for x in batches], 5)
    assert used == 5
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            mean, var = expected[name]
            torch.testing.assert_close(module.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(module.running_var.double(), var, rtol=1e-5, atol=1e-6)
    # everything restored: train mode everywhere, momentum, the batch counter
    assert all(m.training for m in model.modules())
    assert [bn.momentum for bn in batchnorm_layers(model)] == momentum_before
    assert [int(bn.num_batches_tracked) for bn in batchnorm_layers(model)] == tracked_before
    # deterministic: PEDConv's sampling noise and dropout were off (a second pass gives the same numbers)
    first = [bn.running_var.clone() for bn in batchnorm_layers(model)]
    recompute_bn_statistics([model], [(x, None) for x in batches], 5)
    for before, bn in zip(first, batchnorm_layers(model)):
        assert torch.equal(before, bn.running_var)


def test_model_and_ema_in_one_pass_prepare_autocast_and_short_loaders() -> None:
    torch.manual_seed(1)
    model, ema = _Net(), _Net()
    batches = _batches(3, seed=2)
    expected_model, expected_ema = _reference(model, batches), _reference(ema, batches)
    moved: List[int] = []
    calls: List[int] = []

    def prepare(images: torch.Tensor, targets: torch.Tensor):
        moved.append(1)
        return images, targets

    used = recompute_bn_statistics([model.eval(), ema], [(x, torch.zeros(1)) for x in batches], 10, prepare=prepare,
                                   autocast=lambda: torch.autocast("cpu", enabled=False), progress=calls.append)
    assert used == 3 and len(moved) == 3 and calls == [1, 2, 3]  # fewer batches than asked: all of them
    assert not model.training and ema.training  # each model's own mode comes back
    for net, expected in ((model, expected_model), (ema, expected_ema)):
        torch.testing.assert_close(net.bn1.running_var.double(), expected["bn1"][1], rtol=1e-5, atol=1e-6)


def test_failure_part_way_keeps_the_old_statistics() -> None:
    model = _Net()
    before = [bn.running_var.clone() for bn in batchnorm_layers(model)]

    def broken():
        yield torch.randn(4, 3, 6, 6), None
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        recompute_bn_statistics([model], broken(), 5)
    assert all(torch.equal(a, bn.running_var) for a, bn in zip(before, batchnorm_layers(model)))
    assert recompute_bn_statistics([model], [], 5) == 0  # nothing to average: unchanged
    assert all(torch.equal(a, bn.running_var) for a, bn in zip(before, batchnorm_layers(model)))


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _Net()  # same weights on every rank
    batches = _batches(2, seed=10 + rank)  # each rank its own shard
    recompute_bn_statistics([model], [(x, None) for x in batches], 2)
    torch.save({name: b.clone() for name, b in model.state_dict().items() if "running" in name},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_statistics_are_averaged_over_ranks(tmp_path: Path) -> None:
    forkserver_context()  # the server already holds torch: its processes start without importing it again
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="forkserver")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = _Net()
    per_rank = [_reference(model, _batches(2, seed=10 + r)) for r in range(2)]
    for name in ("bn0", "bn1"):
        assert torch.equal(ranks[0][f"{name}.running_var"], ranks[1][f"{name}.running_var"])  # identical
        for index, key in enumerate(("running_mean", "running_var")):
            expected = (per_rank[0][name][index] + per_rank[1][name][index]) / 2
            torch.testing.assert_close(ranks[0][f"{name}.{key}"].double(), expected, rtol=1e-5, atol=1e-6)
