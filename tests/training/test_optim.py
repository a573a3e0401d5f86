"""SGD parameter groups and the per-iteration warmup + decay schedule."""

from __future__ import annotations

import copy as copy_module
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from image_classification.training.optim import (
    LRSchedule,
    RMSpropTF,
    build_optimizer,
    build_scheduler,
    optimizer_name,
    parameter_groups,
)


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
    with pytest.raises(ValueError, match="valid: step, linear, cosine, exponential"):
        LRSchedule("polynomial", 1, 1)
    with pytest.raises(ValueError, match="decay epochs > 0"):
        LRSchedule("exponential", 1, 1)


def test_exponential_policy_is_efficientnets_staircase() -> None:
    """TF's exponential_decay(staircase=True): 0.97 ** floor(step / (2.4 epochs)), counted from step 0, with the
    warmup replacing the first epochs (EfficientNet's build_learning_rate)."""
    sched = LRSchedule("exponential", steps_per_epoch=10, epochs=350, warmup_epochs=5, decay=0.97, decay_epochs=2.4)
    assert sched(0) == pytest.approx(1 / 50) and sched(49) == pytest.approx(1.0)  # linear warmup
    assert sched(50) == pytest.approx(0.97**2)  # 50 / 24 = 2.08: two decays already happened under the warmup
    assert [sched(t) for t in (71, 72, 95, 96)] == pytest.approx([0.97**2, 0.97**3, 0.97**3, 0.97**4])
    assert sched(3499) == pytest.approx(0.97 ** math.floor(3499 / 24))
    args = SimpleNamespace(lr=0.032, end_lr=0.0, lr_schedule="exponential", epochs=3, warmup=0, lr_steps=[1],
                           lr_decay=0.5, lr_decay_epochs=1.5)
    opt = build_optimizer(_net(), 0.032, 0.9, 1e-5, optimizer="rmsprop")
    sched = build_scheduler(opt, args, steps_per_epoch=2)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.032, 0.032, 0.032, 0.016, 0.016, 0.016])


# ------------------------------------------------------------------------------------------ optimizers
def _tf_rmsprop_by_hand(p0, grads, lrs, alpha, eps, momentum, wd):  # noqa: ANN001, ANN202
    """TF1 ApplyRMSProp written out element by element (ms starts at 1, eps inside the root, lr in mom)."""
    p, ms, mom = [float(v) for v in p0], [1.0] * len(p0), [0.0] * len(p0)
    for g_list, lr in zip(grads, lrs):
        for i, g in enumerate(g_list):
            g = g + wd * p[i]
            ms[i] = alpha * ms[i] + (1 - alpha) * g * g
            mom[i] = momentum * mom[i] + lr * g / math.sqrt(ms[i] + eps)
            p[i] = p[i] - mom[i]
    return p


@pytest.mark.parametrize("momentum, wd", [(0.9, 1e-5), (0.0, 0.0), (0.9, 0.1)])
@pytest.mark.parametrize("foreach", [False, True])
def test_rmsprop_tf_against_a_hand_computation(momentum: float, wd: float, foreach: bool) -> None:
    p0 = [0.5, -1.25, 3.0]
    grads = [[0.1, -2.0, 1e-3], [0.3, 0.0, -4.0], [-0.2, 1.5, 0.05]]
    lrs = [0.016, 0.016, 0.004]  # a change of lr: TF applies it to new gradients only (lr inside the momentum)
    param = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = RMSpropTF([param], lr=lrs[0], alpha=0.9, eps=1e-3, momentum=momentum, weight_decay=wd, foreach=foreach)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = _tf_rmsprop_by_hand(p0, grads, lrs, 0.9, 1e-3, momentum, wd)
    assert param.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_rmsprop_tf_is_not_torchs_rmsprop() -> None:
    """torch.optim.RMSprop (eps outside the root, mean square from 0) takes a different first step."""
    a = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    ours = RMSpropTF([a], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.0)
    torchs = torch.optim.RMSprop([b], lr=0.1, alpha=0.9, eps=1e-3)
    for param, opt in ((a, ours), (b, torchs)):
        param.grad = torch.tensor([0.5], dtype=torch.float64)
        opt.step()
    assert float(a.detach()) == pytest.approx(1 - 0.1 * 0.5 / math.sqrt(0.9 + 0.1 * 0.25 + 1e-3))
    assert float(b.detach()) == pytest.approx(1 - 0.1 * 0.5 / (math.sqrt(0.1 * 0.25) + 1e-3))


def test_rmsprop_tf_state_round_trip() -> None:
    net, copy = _net(), _net()
    copy.load_state_dict(net.state_dict())
    first = build_optimizer(net, 0.01, 0.9, 1e-5, optimizer="rmsprop")
    x, w = torch.randn(4, 3, 3, 3), torch.randn(4, 2)
    for _ in range(2):
        (net(x) * w).sum().backward()
        first.step()
        first.zero_grad()
    second = build_optimizer(copy, 0.01, 0.9, 1e-5, optimizer="rmsprop")
    copy.load_state_dict(net.state_dict())
    second.load_state_dict(copy_module.deepcopy(first.state_dict()))  # as a checkpoint: no shared tensors
    for model, opt in ((net, first), (copy, second)):
        (model(x) * w).sum().backward()
        opt.step()
    for p, q in zip(net.parameters(), copy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_build_optimizer_kinds_and_options() -> None:
    rms = build_optimizer(_net(), 0.016, 0.9, 1e-5, optimizer="rmsprop", alpha=0.95)
    assert isinstance(rms, RMSpropTF) and optimizer_name(rms) == "rmsprop"
    assert all(g["eps"] == 1e-3 and g["alpha"] == 0.95 and g["momentum"] == 0.9 for g in rms.param_groups)
    assert [g["weight_decay"] for g in rms.param_groups] == [1e-5, 0.0]  # BN and biases excluded
    adamw = build_optimizer(_net(), 1e-3, 0.9, 0.05, optimizer="adamw", eps=1e-6)
    assert isinstance(adamw, torch.optim.AdamW) and optimizer_name(adamw) == "adamw"
    assert [(g["eps"], g["weight_decay"]) for g in adamw.param_groups] == [(1e-6, 0.05), (1e-6, 0.0)]
    assert optimizer_name(build_optimizer(_net(), 0.1, 0.9, 1e-4)) == "sgd"
    with pytest.raises(ValueError, match="--nesterov is an SGD option"):
        build_optimizer(_net(), 0.1, 0.9, 0.0, nesterov=True, optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer(_net(), 0.1, 0.9, 0.0, optimizer="lamb")


def test_scheduler_state_round_trip() -> None:
    args = SimpleNamespace(lr=0.4, end_lr=0.0, lr_schedule="cosine", epochs=4, warmup=1, lr_steps=[2], lr_decay=0.1,
                           lr_decay_epochs=None)
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
