"""Free adversarial training and PGD (training/adversarial.py) against plain references of their algorithms.

References written here in a few lines each: Shafahi et al. 2019, Alg. 1 (free adversarial training) and
Madry et al. 2018 (l_inf PGD), both with the perturbation in pixel space on a model taking normalised images.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.models import build_model
from image_classification.training.adversarial import (
    FreeAdversarialTraining,
    PGDAttack,
    PixelSpace,
    validate_under_attack,
)
from image_classification.training.checkpoint import derive_seed
from image_classification.training.engine import LoopConfig, TrainingSetup, validate

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
EPS, STEP = 4 / 255, 4 / 255


def _net(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).to(dtype)


def _pixels(n: int, seed: int, dtype: torch.dtype = torch.float64, size: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator, dtype=dtype)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN, dtype=pixels.dtype).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=pixels.dtype).view(1, 3, 1, 1)


def _training_setup(model: nn.Module, lr: float = 0.1) -> TrainingSetup:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainingSetup(model, model, nn.CrossEntropyLoss(), optimizer, scheduler)


def _free(replays: int, slots: int, batch: int, dtype: torch.dtype = torch.float64) -> FreeAdversarialTraining:
    return FreeAdversarialTraining(PixelSpace(MEAN, STD, torch.device("cpu")), replays, EPS, STEP,
                                   (slots, batch, 3, 6, 6), torch.device("cpu"), dtype=dtype)


def _reference_free(model: nn.Module, batches: List[Tuple[torch.Tensor, torch.Tensor]], replays: int,
                    lr: float = 0.1) -> torch.Tensor:
    """Shafahi et al. 2019, Alg. 1 (SGD with momentum), on pixel batches; returns the final perturbation."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    delta = torch.zeros_like(batches[0][0])
    for pixels, target in batches:
        for _ in range(replays):
            d = delta.clone().requires_grad_(True)
            loss = F.cross_entropy(model(_normalise((pixels + d).clamp(0, 1))), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            delta = (delta + STEP * d.grad.sign()).clamp(-EPS, EPS)
    return delta


def test_pixel_space_round_trip() -> None:
    space = PixelSpace(MEAN, STD, torch.device("cpu"))
    pixels = _pixels(2, 0)
    torch.testing.assert_close(space.to_pixels(space.normalise(pixels)), pixels)
    torch.testing.assert_close(space.normalise(pixels), _normalise(pixels))


def test_free_training_equals_the_reference_algorithm() -> None:
    batches = [(_pixels(4, seed), torch.tensor([0, 1, 2, 1])) for seed in range(3)]
    reference = _net()
    expected_delta = _reference_free(reference, batches, replays=3)
    model = _net()
    comp, cfg = _training_setup(model), LoopConfig(torch.device("cpu"))
    free = _free(replays=3, slots=1, batch=4)
    for pixels, target in batches:
        results, lr = free.train_group(comp, cfg, [(_normalise(pixels), target)])
        assert lr == 0.1 and len(results) == 1 and results[0][3] == 4
    assert comp.scheduler.last_epoch == 3 * len(batches)  # every replay is an optimizer step
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(free.perturbation[0], expected_delta, rtol=0, atol=1e-15)
    assert float(free.perturbation.abs().max()) == pytest.approx(EPS)  # it moved, and no further than eps


def test_accumulation_trains_like_one_big_batch() -> None:
    """Two mini-batches of 2 with accumulation = one mini-batch of 4 (no BatchNorm: the gradients are equal)."""
    pixels, target = _pixels(4, 1), torch.tensor([2, 0, 1, 1])
    big, small = _net(), _net()
    free_big, free_small = _free(2, 1, 4), _free(2, 2, 2)
    comp_big, comp_small = _training_setup(big), _training_setup(small)
    for _ in range(2):
        free_big.train_group(comp_big, LoopConfig(torch.device("cpu")), [(_normalise(pixels), target)])
        results, _ = free_small.train_group(comp_small, LoopConfig(torch.device("cpu"), accumulation=2),
                                            [(_normalise(pixels[:2]), target[:2]),
                                             (_normalise(pixels[2:]), target[2:])])
        assert [r[3] for r in results] == [2, 2]
    for ours, theirs in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(free_small.perturbation.reshape(4, 3, 6, 6), free_big.perturbation[0], rtol=0, atol=0)
    assert comp_small.scheduler.last_epoch == comp_big.scheduler.last_epoch == 4


def test_perturbed_images_stay_in_the_pixel_range_and_the_budget() -> None:
    free = _free(4, 1, 8, dtype=torch.float32)
    model = _net(torch.float32)
    comp, cfg = _training_setup(model, lr=0.5), LoopConfig(torch.device("cpu"))
    # pixels at both ends of the range and in the middle
    pixels = torch.cat([torch.zeros(3, 3, 6, 6), torch.ones(3, 3, 6, 6), torch.full((2, 3, 6, 6), 0.5)])
    images = _normalise(pixels)
    for _ in range(3):
        free.train_group(comp, cfg, [(images, torch.arange(8) % 3)])
    assert float(free.perturbation.abs().max()) <= EPS + 1e-7
    perturbed = PixelSpace(MEAN, STD, torch.device("cpu")).to_pixels(free.perturbed(images, 0))
    assert float(perturbed.min()) >= -1e-6 and float(perturbed.max()) <= 1 + 1e-6
    assert float((perturbed - pixels).abs().max()) <= EPS + 1e-6
    assert float((perturbed[6:] - pixels[6:]).abs().max()) == pytest.approx(EPS, abs=1e-6)  # mid-range pixels moved


def test_calibration_batches_get_the_perturbation_slot_by_slot() -> None:
    free = _free(1, 2, 2)
    free.perturbation[0].fill_(1 / 255)
    free.perturbation[1].fill_(-1 / 255)
    prepare = free.calibration_prepare(lambda x, y: (x, y))
    pixels = torch.full((2, 3, 6, 6), 0.5, dtype=torch.float64)
    shifts = [float(PixelSpace(MEAN, STD, torch.device("cpu")).to_pixels(prepare(_normalise(pixels), None)[0]).mean())
              - 0.5 for _ in range(3)]
    assert shifts == pytest.approx([1 / 255, -1 / 255, 1 / 255])


def test_loading_a_perturbation_checks_shape_and_budget() -> None:
    free = _free(1, 1, 2)
    assert free.load_perturbation(torch.full((1, 2, 3, 6, 6), 2 / 255, dtype=torch.float64)) is None
    assert float(free.perturbation.max()) == pytest.approx(2 / 255)
    assert "does not fit" in free.load_perturbation(torch.zeros(1, 4, 3, 6, 6))
    assert "not within" in free.load_perturbation(torch.full((1, 2, 3, 6, 6), 0.5))


# ------------------------------------------------------------------------------------------------------ PGD
def _reference_pgd(model: nn.Module, pixels: torch.Tensor, target: torch.Tensor, eps: float, step: float,
                   steps: int, start: torch.Tensor) -> torch.Tensor:
    """Madry et al.'s l_inf PGD in pixel space from ``start`` (a few lines, as the papers' code writes it)."""
    adversarial = start.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(_normalise(adversarial)), target)
        (grad,) = torch.autograd.grad(loss, adversarial)
        adversarial = adversarial.detach() + step * grad.sign()
        adversarial = torch.min(torch.max(adversarial, pixels - eps), pixels + eps).clamp(0, 1)
    return adversarial


def _brightness_task(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class = whether an image is slightly brighter (+0.03) or darker than grey: learnable, and attackable
    with eps = 8/255 (0.031)."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 2, (n,), generator=generator)
    pixels = 0.5 + 0.03 * (2 * target.to(dtype) - 1).view(-1, 1, 1, 1) + 0.01 * torch.randn(
        n, 3, 6, 6, generator=generator, dtype=dtype)
    return pixels.clamp(0, 1), target


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(150):
        pixels, target = _brightness_task(32, step)
        loss = F.cross_entropy(model(_normalise(pixels)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval()


def test_pgd_equals_the_reference_without_random_start(trained: nn.Module) -> None:
    pixels, target = _brightness_task(16, 1000)
    attack = PGDAttack(PixelSpace(MEAN, STD, torch.device("cpu")), 8 / 255, 2 / 255, 5, random_start=False)
    ours = PixelSpace(MEAN, STD, torch.device("cpu")).to_pixels(attack(trained, _normalise(pixels), target))
    theirs = _reference_pgd(trained, pixels, target, 8 / 255, 2 / 255, 5, pixels)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(trained(_normalise(ours)).argmax(1), trained(_normalise(theirs)).argmax(1))


def test_pgd_random_start_is_seeded_and_uniform_in_the_ball(trained: nn.Module) -> None:
    pixels, target = _brightness_task(16, 1001)
    space = PixelSpace(MEAN, STD, torch.device("cpu"))
    attack = PGDAttack(space, 8 / 255, 2 / 255, 3)
    first = attack(trained, _normalise(pixels), target, torch.Generator().manual_seed(5))
    again = attack(trained, _normalise(pixels), target, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(5))
    start = (pixels + (2 * noise - 1) * 8 / 255).clamp(0, 1)
    theirs = _reference_pgd(trained, pixels, target, 8 / 255, 2 / 255, 3, start)
    adversarial = space.to_pixels(first)
    torch.testing.assert_close(adversarial, theirs, rtol=0, atol=1e-6)
    assert float(adversarial.min()) >= -1e-6 and float(adversarial.max()) <= 1 + 1e-6  # the pixel range
    assert float((adversarial - pixels).abs().max()) <= 8 / 255 + 1e-6  # the budget


def test_robust_accuracy_is_below_natural_and_within_budget(trained: nn.Module) -> None:
    batches = [_brightness_task(16, 2000 + i) for i in range(3)]
    loader = [(_normalise(pixels), target) for pixels, target in batches]
    cfg = LoopConfig(torch.device("cpu"), print_freq=100)
    natural = validate(trained, cfg, loader, nn.CrossEntropyLoss())
    attack = PGDAttack(PixelSpace(MEAN, STD, torch.device("cpu")), 8 / 255, 2 / 255, 10)
    robust = validate_under_attack(trained, cfg, loader, nn.CrossEntropyLoss(), attack, "val_pgd10", seed=1)
    assert natural["val.top1"] > 90
    assert robust["val_pgd10.top1"] < natural["val.top1"] - 30
    assert robust["val_pgd10.samples"] == natural["val.samples"] == 48
    assert 0 < robust["val_pgd10.linf"] <= 8 + 1e-4  # in 1/255
    assert not trained.training and all(p.grad is None for p in trained.parameters())
    # the same numbers from the reference PGD with the same random starts
    correct = 0
    for i, (pixels, target) in enumerate(batches):
        noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(derive_seed(1, 0, i)))
        start = (pixels + (2 * noise - 1) * 8 / 255).clamp(0, 1)
        adversarial = _reference_pgd(trained, pixels, target, 8 / 255, 2 / 255, 10, start)
        with torch.no_grad():
            correct += int((trained(_normalise(adversarial)).argmax(1) == target).sum())
    assert robust["val_pgd10.top1"] == pytest.approx(100 * correct / 48)


@pytest.mark.parametrize("seed", [2**31 - 1, 2**32 - 1])
def test_the_largest_seeds_give_valid_generator_seeds(trained: nn.Module, seed: int) -> None:
    """--seed accepts up to 2**32-1: the per-batch seeds of the random starts must not overflow int64."""
    loader = [(_normalise(pixels), target) for pixels, target in (_brightness_task(4, 3000 + i) for i in range(2))]
    attack = PGDAttack(PixelSpace(MEAN, STD, torch.device("cpu")), 8 / 255, 2 / 255, 1)
    cfg = LoopConfig(torch.device("cpu"), print_freq=100)
    first = validate_under_attack(trained, cfg, loader, nn.CrossEntropyLoss(), attack, "val_pgd1", seed=seed, rank=7)
    again = validate_under_attack(trained, cfg, loader, nn.CrossEntropyLoss(), attack, "val_pgd1", seed=seed, rank=7)
    assert first["val_pgd1.samples"] == 8 and first["val_pgd1.top1"] == again["val_pgd1.top1"]
    assert 0 <= derive_seed(seed, 7, 10**9) < 2**63
    assert len({derive_seed(seed, r, i) for r in range(3) for i in range(50)}) == 150


def test_pedconv_in_eval_mode_is_deterministic_under_attack() -> None:
    """No sampling noise at evaluation: the attacked function is the evaluated one, and two attacks agree."""
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", conv="pedconv", num_classes=3).eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), rtol=0, atol=0)
    space = PixelSpace((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    images = space.normalise(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    attack = PGDAttack(space, 4 / 255, 1 / 255, 2)
    first = attack(model, images, torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(1))
    second = attack(model, images, torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert float((first - images).abs().max()) > 0


def test_fp16_input_gradient_backs_off_its_loss_scale() -> None:
    """A loss scale that overflows is halved until the gradient is finite; its sign is the true one."""

    class Steep(nn.Module):  # gradient 1e34 per pixel: x 2^16 overflows float32
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x.flatten(1).sum(1) * 1e34, -x.flatten(1).sum(1) * 1e34], dim=1)

    attack = PGDAttack(PixelSpace((0.0,), (1.0,), torch.device("cpu")), 4 / 255, 1 / 255, 1, random_start=False)
    pixels = torch.full((2, 1, 2, 2), 0.5)
    grad = attack._input_gradient(Steep(), pixels, torch.tensor([1, 1]), lambda: torch.autocast("cpu", enabled=False),
                                  fp16=True)
    assert bool(torch.isfinite(grad).all()) and bool((grad > 0).all())  # class 1 wants a smaller sum: ascend
    assert attack.loss_scale < 2.0**16


def test_invalid_budgets_are_refused() -> None:
    space = PixelSpace(MEAN, STD, torch.device("cpu"))
    with pytest.raises(ValueError, match="PGD needs"):
        PGDAttack(space, 0.0, 1 / 255, 10)
    with pytest.raises(ValueError, match="free adversarial training needs"):
        FreeAdversarialTraining(space, 0, EPS, STEP, (1, 2, 3, 6, 6), torch.device("cpu"))
