"""SGD parameter groups and the per-iteration warmup + decay schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from image_classification.training.optim import LRSchedule, build_optimizer, build_scheduler, parameter_groups


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_bn_and_bias_excluded_from_weight_decay() -> None:
    net = _net()
    decay, no_decay = parameter_groups(net, 1e-4)
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0


def test_bn_weight_decay_decays_everything() -> None:
    net = _net()
    (group,) = parameter_groups(net, 5e-5, bn_weight_decay=True)
    assert len(group["params"]) == len(list(net.parameters())) and group["weight_decay"] == 5e-5


def test_optimizer_settings() -> None:
    opt = build_optimizer(_net(), lr=0.2, momentum=0.875, weight_decay=1e-4, nesterov=True)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.875 and g["nesterov"] for g in opt.param_groups)
    with pytest.raises(ValueError, match="--nesterov"):
        build_optimizer(_net(), lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=True)


def test_warmup_is_linear_per_iteration() -> None:
    sched = LRSchedule("cosine", steps_per_epoch=10, epochs=5, warmup_epochs=2)
    assert [sched(t) for t in (0, 9, 19)] == pytest.approx([1 / 20, 10 / 20, 1.0])


@pytest.mark.parametrize("policy, mid, last", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0)])
def test_linear_and_cosine_decay(policy: str, mid: float, last: float) -> None:
    sched = LRSchedule(policy, steps_per_epoch=10, epochs=3, warmup_epochs=1)
    assert sched(10) == pytest.approx(1.0)
    assert sched(20) == pytest.approx(mid)
    assert sched(30) == pytest.approx(last)


def test_cosine_shape_and_end_lr() -> None:
    sched = LRSchedule("cosine", steps_per_epoch=4, epochs=10, end_ratio=0.1)
    assert sched(10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 40)))
    assert sched(40) == pytest.approx(0.1)


def test_step_policy_milestones() -> None:
    sched = LRSchedule("step", steps_per_epoch=2, epochs=10, milestones=(3, 6), decay=0.5)
    assert [sched(t) for t in (0, 5, 6, 11, 12)] == pytest.approx([1, 1, 0.5, 0.5, 0.25])


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="exponential"):
        LRSchedule("exponential", 1, 1)


def test_scheduler_state_round_trip() -> None:
    args = SimpleNamespace(lr=0.4, end_lr=0.0, lr_schedule="cosine", epochs=4, warmup=1, lr_steps=[2], lr_decay=0.1)
    opt = build_optimizer(_net(), 0.4, 0.9, 1e-4)
    sched = build_scheduler(opt, args, steps_per_epoch=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 / 5)
    for _ in range(7):
        opt.step()
        sched.step()
    expected = opt.param_groups[0]["lr"]
    opt2 = build_optimizer(_net(), 0.4, 0.9, 1e-4)
    sched2 = build_scheduler(opt2, args, steps_per_epoch=5)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert expected == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 2 / 15)))
