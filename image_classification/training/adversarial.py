"""Free adversarial training and evaluation under PGD, with l_inf budgets in pixel space (PEDConv Table 4).

The model takes normalised images ``x = (p - mean) / std`` with pixels ``p`` in ``[0, 1]``; every budget,
step, projection and clamp below is in pixel space (``eps = 4/255``), as in the papers' code, where the
normalisation is the model's first operation.

**Free adversarial training** (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019, Alg. 1; the
training of PEDConv, BMVC 2021, Sec. 4.4 / Table 4). One perturbation ``delta`` (zeros at the start of
training) is kept across mini-batches, replays and epochs. Each mini-batch ``(p, y)`` is replayed ``m`` times;
replay ``r``:

1. ``x_adv = normalise(clamp(p + delta, 0, 1))``;
2. one forward and one backward of the training loss (cross-entropy with label smoothing, plus the PEDConv
   info-max term) give the weights' gradient and ``g = d loss / d delta`` together;
3. the optimizer steps (every replay is an optimizer step: SGD, EMA and the lr schedule count it);
4. ``delta <- clip(delta + step * sign(g), -eps, eps)`` (``step = eps`` in the paper).

``delta`` then starts the next mini-batch, so after the first replays of training every batch is attacked
with a perturbation that has seen ``m`` gradient-sign steps -- for the price of the ``m`` training steps.
Training for ``epochs / m`` epochs costs what natural training for ``epochs`` does.

Decisions where the paper is silent (PEDConv does not describe its adversarial training beyond [Shafahi]):

* ``delta`` ascends the full training loss, info-max term included (lambda = 1e-3), because it is the
  gradient the single backward pass provides; a cross-entropy-only gradient would cost a second backward.
* Gradient accumulation (``--optimizer-batch-size`` > batch x processes) keeps one perturbation slot per
  mini-batch of an optimizer step; the replays run over the whole accumulation group, so one process with
  accumulation trains exactly as many processes without it.
* Under DDP each rank keeps its own perturbation (it belongs to the rank's images); checkpoints store every
  rank's, so ``--resume`` continues with the same perturbations (a resume on another number of ranks or
  batch size starts from zero, with a note).
* A replay whose scaled fp16 gradient overflowed (the GradScaler skips that optimizer step) does not move
  ``delta`` either.

**PGD** (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018): from a
uniform random start in the eps ball (or the clean image), ``K`` steps of
``p_adv <- clamp(project_eps(p_adv + step * sign(d CE / d p_adv)), 0, 1)`` on the model in eval mode, then
the accuracy on ``p_adv``. PEDConv in eval mode is deterministic (its generator uses the mean of the
Gaussian of Eq. 5, no sampling), so the attack differentiates the very function that is evaluated: no
sampling noise masks the gradient and no expectation over noise is needed. Under ``--amp fp16`` the input
gradient is computed with a dynamic loss scale (as torch.amp's GradScaler does for weights), so that the
signs of small gradients are not lost to fp16 underflow.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.data import BatchLoader

from .checkpoint import derive_seed
from .engine import (
    Adversary,
    BatchResults,
    LoopConfig,
    MicroBatches,
    TrainingSetup,
    backward,
    forward_loss,
    optimizer_step,
)
from .logger import Progress

__all__ = ["PixelSpace", "FreeAdversarialTraining", "PGDAttack", "build_free_adversarial_training",
           "build_attacks", "validate_under_attack", "attack_metadata", "perturbation_checkpoint", "PIXEL_LEVELS"]

PIXEL_LEVELS = 255.0  # the command line's budgets are in 1/255 of the [0, 1] pixel range
MicroBatch = Tuple[torch.Tensor, torch.Tensor]


class PixelSpace:
    """Maps the loaders' normalised images to pixels in ``[0, 1]`` and back: ``p = x * std + mean``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool = False) -> None:
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float64, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float64, device=device).view(1, -1, 1, 1)
        self.channels_last = channels_last
        self._cast: Dict[torch.dtype, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._cast:
            self._cast[dtype] = (self.mean.to(dtype), self.std.to(dtype))
        return self._cast[dtype]

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``images * std + mean`` in float32 at least (float64 stays float64)."""
        images = images.to(torch.promote_types(images.dtype, torch.float32))
        mean, std = self._stats(images.dtype)
        return images * std + mean

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(pixels.dtype)
        images = (pixels - mean) / std
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


class FreeAdversarialTraining:
    """The replay loop of free adversarial training and its perturbation (module docstring).

    ``eps`` and ``step_size`` are in pixel units (``4 / 255``). ``shape`` = (mini-batches per optimizer
    step, batch size, channels, height, width): the perturbation buffer, one slot per mini-batch of an
    accumulation group, zeros at the start.
    """

    def __init__(self, pixels: PixelSpace, replays: int, eps: float, step_size: float,
                 shape: Tuple[int, int, int, int, int], device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> None:
        if replays < 1 or not eps > 0 or not step_size > 0:
            raise ValueError(f"free adversarial training needs replays >= 1, eps > 0 and step > 0, got {replays}, "
                             f"{eps}, {step_size}")
        self.pixels = pixels
        self.replays = int(replays)
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.perturbation = torch.zeros(shape, dtype=dtype, device=device)

    def _slot(self, index: int, images: torch.Tensor) -> torch.Tensor:
        """The perturbation of mini-batch ``index`` of a group (a view), grown if a batch is larger."""
        n = images.shape[0]
        if index >= self.perturbation.shape[0] or n > self.perturbation.shape[1] or \
                tuple(images.shape[1:]) != tuple(self.perturbation.shape[2:]):
            raise ValueError(f"free adversarial training: mini-batch {index} of shape {tuple(images.shape)} does "
                             f"not fit the perturbation buffer {tuple(self.perturbation.shape)}")
        return self.perturbation[index, :n]

    def train_group(self, comp: TrainingSetup, cfg: LoopConfig, batches: MicroBatches) -> Tuple[BatchResults, float]:
        """Replay the mini-batches of one optimizer step ``replays`` times (one optimizer step per replay).

        Returns, per mini-batch, ``(task loss, info-max loss, correct, n)`` averaged over the replays (as the
        replays saw them: on perturbed images), and the learning rate of the first replay.
        """
        if comp.mixup is not None:
            raise ValueError("free adversarial training does not combine with mixup")
        pixels = [self.pixels.to_pixels(images) for images, _ in batches]
        sums = [torch.zeros(3, dtype=torch.float64, device=cfg.device) for _ in batches]
        lr = comp.optimizer.param_groups[0]["lr"]
        last = len(batches) - 1
        for _ in range(self.replays):
            for j, ((images, target), clean) in enumerate(zip(batches, pixels)):
                slot = self._slot(j, images)
                delta = slot.detach().clone().requires_grad_(True)
                adversarial = self.pixels.normalise((clean + delta).clamp(0.0, 1.0))
                no_sync = getattr(comp.model, "no_sync", None)  # DistributedDataParallel's
                sync: ContextManager[Any] = (no_sync() if j != last and no_sync is not None
                                             else contextlib.nullcontext())
                with sync:
                    loss, task, infomax, correct = forward_loss(comp, cfg, adversarial, target)
                    backward(comp, cfg, loss)
                grad = delta.grad
                assert grad is not None  # delta requires grad and the loss depends on it
                # the sign is scale-invariant; a non-finite (overflowed fp16) gradient leaves delta where it is
                step = torch.where(torch.isfinite(grad).all(), self.step_size * grad.sign(), torch.zeros_like(grad))
                slot.add_(step).clamp_(-self.eps, self.eps)
                sums[j] += torch.stack([task.detach().double(), infomax.detach().double(), correct.double()])
            optimizer_step(comp)
        results = []
        for (images, _), total in zip(batches, sums):
            mean = total / self.replays
            results.append((mean[0], mean[1], mean[2], images.shape[0]))
        return results, lr

    @torch.no_grad()
    def perturbed(self, images: torch.Tensor, index: int) -> torch.Tensor:
        """``images`` with slot ``index % slots`` of the current perturbation added (for precise BN)."""
        slot = self._slot(index % self.perturbation.shape[0], images)
        return self.pixels.normalise((self.pixels.to_pixels(images) + slot).clamp(0.0, 1.0))

    def calibration_prepare(self, prepare: Callable[[torch.Tensor, torch.Tensor], MicroBatch]
                            ) -> Callable[[torch.Tensor, torch.Tensor], MicroBatch]:
        """``prepare`` followed by adding the perturbation, slot by slot: BatchNorm statistics recomputed by
        ``--precise-bn`` then describe the perturbed images training normalised with."""
        counter = iter(range(2**62))

        def perturb(images: torch.Tensor, target: torch.Tensor) -> MicroBatch:
            images, target = prepare(images, target)
            return self.perturbed(images, next(counter)), target

        return perturb

    def checkpoint_entry(self, world_size: int) -> Optional[Dict[str, Any]]:
        """What a checkpoint stores: every rank's perturbation (on CPU, gathered to rank 0; a collective under
        DDP, None on the other ranks) and the settings it was made with."""
        local = self.perturbation.detach().cpu()
        per_rank: Optional[List[Any]] = [local]
        if world_size > 1:
            import torch.distributed as dist

            per_rank = [None] * world_size if dist.get_rank() == 0 else None
            dist.gather_object(local, per_rank, dst=0)
            if per_rank is None:
                return None
        return {"method": "free", "replays": self.replays, "eps": self.eps, "step_size": self.step_size,
                "perturbation_per_rank": per_rank}

    def load_perturbation(self, tensor: Any) -> Optional[str]:
        """Adopt a checkpoint's perturbation; returns why not (a note) when it does not fit this run."""
        if not isinstance(tensor, torch.Tensor) or tensor.shape != self.perturbation.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
            return (f"the checkpoint's adversarial perturbation {shape} does not fit this run's "
                    f"{tuple(self.perturbation.shape)} (other batch size, accumulation or image size)")
        if not bool(torch.isfinite(tensor).all()) or float(tensor.abs().max()) > self.eps * (1 + 1e-6):
            return ("the checkpoint's adversarial perturbation is not within this run's eps "
                    f"{self.eps * PIXEL_LEVELS:g}/255")
        self.perturbation.copy_(tensor.to(self.perturbation.device))
        return None


def build_free_adversarial_training(args: argparse.Namespace, loaders: Any, cfg: LoopConfig
                                    ) -> Optional[FreeAdversarialTraining]:
    """The free adversarial trainer of ``--adv-train free`` (None without it, and for ``--evaluate``)."""
    if args.adv_train != "free" or args.evaluate:
        return None
    pixels = PixelSpace(loaders.mean, loaders.std, cfg.device, cfg.channels_last)
    shape = (cfg.accumulation, args.batch_size, loaders.in_chans, loaders.image_size, loaders.image_size)
    return FreeAdversarialTraining(pixels, args.adv_replays, args.adv_eps / PIXEL_LEVELS,
                                   args.adv_step_size / PIXEL_LEVELS, shape, cfg.device)


def perturbation_checkpoint(adversary: Optional[Adversary], world_size: int) -> Optional[Dict[str, Any]]:
    """What a checkpoint stores of the run's adversarial training (:meth:`FreeAdversarialTraining.checkpoint_entry`;
    a collective under DDP), None without one."""
    return None if adversary is None else adversary.checkpoint_entry(world_size)


class PGDAttack:
    """l_inf projected gradient descent in pixel space (module docstring); ``eps``/``step_size`` in ``[0, 1]``
    pixel units."""

    def __init__(self, pixels: PixelSpace, eps: float, step_size: float, steps: int, random_start: bool = True
                 ) -> None:
        if not eps > 0 or not step_size > 0 or steps < 1:
            raise ValueError(f"PGD needs eps > 0, step > 0 and >= 1 step, got {eps}, {step_size}, {steps}")
        self.pixels = pixels
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.random_start = bool(random_start)
        self.loss_scale = 2.0**16  # fp16 only: halved on an overflow, doubled after _GROWTH_INTERVAL good steps
        self._good_steps = 0

    _GROWTH_INTERVAL = 200

    def describe(self) -> str:
        start = "random start" if self.random_start else "clean start"
        return (f"PGD-{self.steps} (eps {self.eps * PIXEL_LEVELS:g}/255, step {self.step_size * PIXEL_LEVELS:g}/255, "
                f"{start})")

    def _input_gradient(self, model: nn.Module, pixels: torch.Tensor, target: torch.Tensor,
                        autocast: Callable[[], Any], fp16: bool) -> torch.Tensor:
        """d sum_i CE(model(normalise(pixels_i)), y_i) / d pixels (scaled when fp16: only its sign is used)."""
        while True:
            pixels = pixels.detach().requires_grad_(True)
            with autocast():
                output = model(self.pixels.normalise(pixels))
            loss = F.cross_entropy(output.float(), target, reduction="sum")
            if not fp16:
                (grad,) = torch.autograd.grad(loss, pixels)
                return grad
            (grad,) = torch.autograd.grad(loss * self.loss_scale, pixels)
            if bool(torch.isfinite(grad).all()):
                self._good_steps += 1
                if self._good_steps % self._GROWTH_INTERVAL == 0:
                    self.loss_scale = min(self.loss_scale * 2.0, 2.0**24)
                return grad
            if self.loss_scale <= 1.0:
                raise FloatingPointError("PGD: the input gradient overflows in fp16 even without loss scaling; "
                                         "evaluate with --amp-dtype bf16 or without --amp")
            self.loss_scale /= 2.0
            self._good_steps = 0

    def __call__(self, model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                 generator: Optional[torch.Generator] = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext, fp16: bool = False) -> torch.Tensor:
        """The adversarial version of the normalised ``images`` (normalised), for ``model`` as it is (the
        caller puts it in eval mode). No parameter gradient is accumulated."""
        clean = self.pixels.to_pixels(images).detach()
        adversarial = clean.clone()
        if self.random_start:
            noise = torch.rand(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
            adversarial = (adversarial + (2.0 * noise - 1.0) * self.eps).clamp(0.0, 1.0)
        low, high = clean - self.eps, clean + self.eps
        with torch.enable_grad():
            for _ in range(self.steps):
                grad = self._input_gradient(model, adversarial, target, autocast, fp16)
                adversarial = adversarial.detach() + self.step_size * grad.sign()
                adversarial = torch.minimum(torch.maximum(adversarial, low), high).clamp(0.0, 1.0)
        return self.pixels.normalise(adversarial.detach())


def build_attacks(args: argparse.Namespace, loaders: Any, cfg: LoopConfig) -> List[PGDAttack]:
    """One :class:`PGDAttack` per ``--attack-steps`` value (none without ``--attack pgd``)."""
    if args.attack != "pgd":
        return []
    pixels = PixelSpace(loaders.mean, loaders.std, cfg.device, cfg.channels_last)
    return [PGDAttack(pixels, args.attack_eps / PIXEL_LEVELS, args.attack_step_size / PIXEL_LEVELS, steps,
                      random_start=args.attack_start == "random") for steps in args.attack_steps]


def attack_metadata(prefix: str) -> Dict[str, Dict[str, Any]]:
    """DLLogger METADATA (unit, format) of the metrics :func:`validate_under_attack` logs under ``prefix``."""
    percent = {"unit": "%", "format": ":>5.2f"}
    return {f"{prefix}.top1": percent, f"{prefix}.top5": percent,
            f"{prefix}.loss": {"unit": None, "format": ":>5.5f"},
            f"{prefix}.linf": {"unit": "1/255", "format": ":>5.3f"},
            f"{prefix}.samples": {"unit": "images", "format": ":d"},
            f"{prefix}.time": {"unit": "s", "format": ":>5.1f"}}


def validate_under_attack(model: nn.Module, cfg: LoopConfig, loader: BatchLoader, criterion: nn.Module,
                          attack: PGDAttack, prefix: str, epoch: int = 0, seed: int = 0, rank: int = 0
                          ) -> Dict[str, float]:
    """Top-1/top-5/loss on the adversarial versions of the validation set (exact over all ranks), and the
    largest pixel-space perturbation used (``{prefix}.linf``, in 1/255).

    The random start of batch ``i`` on rank ``r`` is drawn from a generator seeded with
    ``derive_seed(seed, r, i)``:
    an evaluation is reproducible and does not touch the global random streams.
    """
    from .distributed import all_reduce_sum

    was_training = model.training
    model.eval()
    total = cfg.iterations(len(loader))
    sums = torch.zeros(4, dtype=torch.float64, device=cfg.device)  # loss*n, correct1, correct5, n
    linf = torch.zeros((), dtype=torch.float64, device=cfg.device)
    fp16 = cfg.amp_dtype == torch.float16
    progress = Progress(f"Epoch {epoch} {prefix}", total, cfg.print_freq, enabled=cfg.is_main)
    started = time.perf_counter()
    try:
        for i, (images, target) in enumerate(loader):
            if i >= total:
                break
            images, target = cfg.to_device(images, target)
            generator = torch.Generator(device=images.device).manual_seed(derive_seed(seed, rank, i))
            adversarial = attack(model, images, target, generator, cfg.autocast, fp16)
            with torch.no_grad():
                with cfg.autocast():
                    output = model(adversarial)
                loss = criterion(output.float(), target)
                distance = (attack.pixels.to_pixels(adversarial) - attack.pixels.to_pixels(images)).abs().amax()
            linf = torch.maximum(linf, distance.double())
            k = min(5, output.shape[1])
            hits = output.topk(k, dim=1).indices == target[:, None]
            n = target.shape[0]
            sums += torch.stack([loss.double() * n, hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                 torch.tensor(float(n), dtype=torch.float64, device=cfg.device)])
            if (i + 1) % cfg.print_freq == 0 or i + 1 == total:
                progress.update(i + 1, {"top1": float(100 * sums[1] / sums[3])})
            else:
                progress.tick(i + 1)
    finally:
        model.train(was_training)
    loss_sum, correct1, correct5, n = all_reduce_sum(sums.tolist(), cfg.device)
    if cfg.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(linf, op=dist.ReduceOp.MAX)
    n_safe = max(n, 1.0)
    metrics = {
        f"{prefix}.top1": 100.0 * correct1 / n_safe,
        f"{prefix}.top5": 100.0 * correct5 / n_safe,
        f"{prefix}.loss": loss_sum / n_safe,
        f"{prefix}.linf": float(linf) * PIXEL_LEVELS,
        f"{prefix}.samples": n,
        f"{prefix}.time": time.perf_counter() - started,
    }
    progress.close({k: metrics[k] for k in (f"{prefix}.top1", f"{prefix}.top5", f"{prefix}.linf")})
    return metrics
