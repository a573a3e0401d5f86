"""One training epoch and one validation pass.

Training loss (per mini-batch): ``CE_ls(f(x_mix), y_mix) + lambda * sum_l MSE_l`` where ``CE_ls`` is
cross-entropy with label smoothing on the mixup soft targets and the sum is the info-max term of every
PEDConv layer (PEDConv, BMVC 2021, Eq. 6, MSE form) returned by :func:`infomax_loss` for the last forward.
With free adversarial training (``TrainingSetup.adversary``) each optimizer step's mini-batches are replayed
on perturbed images (:mod:`.adversarial`); the logged losses and top-1 are their averages over the replays.
Validation is exact: per-rank sums of loss, correct top-1/top-5 and sample counts are all-reduced once.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, cast

import torch
import torch.nn as nn

from image_classification.compat import is_compiler_error, uncompile
from image_classification.data import BatchLoader
from image_classification.dynamic import infomax_loss

from .distributed import all_reduce_sum, any_rank, is_active
from .logger import Progress, RaportWriter

__all__ = ["Adversary", "BatchResults", "MicroBatches", "TrainingSetup", "LoopConfig", "backward", "forward_loss",
           "optimizer_step", "EpochResult", "NonFiniteLossError", "train_one_epoch", "validate",
           "check_finite_validation"]


_STOP_CHECK_EVERY = 5  # optimizer steps between stop-flag checks under DDP


#: one optimizer step's mini-batches, (images, target) each
MicroBatches = Sequence[Tuple[torch.Tensor, torch.Tensor]]
#: per mini-batch: (task loss, info-max loss, correct predictions, images)
BatchResults = List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]


class Adversary(Protocol):
    """What :func:`train_one_epoch` asks of an adversarial trainer (``TrainingSetup.adversary``; e.g.
    :class:`.adversarial.FreeAdversarialTraining`): take over the optimizer steps of one accumulation group.
    It works through the public step functions :func:`forward_loss`, :func:`backward` and :func:`optimizer_step`;
    the trainer also resumes its schedule position (``replays``), checkpoints it and recomputes precise BN
    statistics on what it trains on."""

    #: optimizer steps per accumulation group (each replay of the group is one)
    replays: int

    def train_group(self, comp: TrainingSetup, cfg: LoopConfig, batches: MicroBatches) -> Tuple[BatchResults, float]:
        """Train on ``batches`` (one optimizer step's mini-batches); their results and the learning rate used."""
        ...

    def calibration_prepare(self, prepare: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
                            ) -> Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
        """``prepare`` (moves a batch to the device) followed by what training does to the images, for precise BN."""
        ...

    def checkpoint_entry(self, world_size: int) -> Optional[Dict[str, Any]]:
        """What a checkpoint stores of it (a collective under DDP; None on the ranks that do not write)."""
        ...


@dataclass
class TrainingSetup:
    """The objects a training step works on: network, loss, optimizer, LR schedule, AMP grad scaler, EMA copy,
    mixup and the adversary. ``model`` runs the forward (maybe DDP), ``module`` is unwrapped."""

    model: nn.Module
    module: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # build_scheduler's: one LRSchedule as its lambda
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None
    mixup: Optional[Callable] = None
    adversary: Optional[Adversary] = None  # replays each optimizer step's mini-batches (free adversarial training)

    def evaluated_models(self) -> List[Tuple[str, nn.Module]]:
        """The unwrapped model and, with ``--use-ema``, its EMA copy, each with its metric prefix (``val``,
        ``val_ema``): every model that is validated, attacked, re-estimated (precise BN) and checked for NaN."""
        return [("val", self.module)] + ([("val_ema", self.ema.module)] if self.ema is not None else [])


@dataclass
class LoopConfig:
    device: torch.device
    accumulation: int = 1
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    infomax_weight: float = 0.0
    prof: int = -1
    print_freq: int = 10
    is_main: bool = True
    world_size: int = 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def iterations(self, loader_len: int) -> int:
        return min(loader_len, self.prof) if self.prof > 0 else loader_len

    def to_device(self, images: torch.Tensor, target: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target.to(self.device, non_blocking=True)


class NonFiniteLossError(RuntimeError):
    """The training or validation loss became NaN/inf: the run diverged (one-line message; exit status 3)."""


@dataclass
class EpochResult:
    """How far an epoch got: its summary metrics when it ended, and when it was interrupted the totals of the
    iterations it trained (:meth:`_Window.totals`), which a mid-epoch checkpoint keeps so that the resumed
    epoch's summary covers the whole epoch."""

    iterations: int
    interrupted: bool
    metrics: Dict[str, float] = field(default_factory=dict)
    totals: Optional[Dict[str, float]] = None


class _Window:
    """Device-side sums over a logging window (no host sync until :meth:`flush`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss*n, infomax*n, correct, n
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)  # first non-finite iteration
        self.data_time = 0.0
        self.compute_time = 0.0
        self.batches = 0

    def add(self, loss: torch.Tensor, infomax: torch.Tensor, correct: torch.Tensor, n: int,
            iteration: int = 0) -> None:
        update = torch.stack([loss.detach().double() * n, infomax.detach().double() * n, correct.double()])
        self.sums[:3] += update
        self.sums[3] += n
        self.batches += 1
        # device-side bookkeeping (no host sync): the first iteration whose loss is NaN/inf
        bad = ~torch.isfinite(update[:2]).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), iteration, self.first_bad)

    def check_finite(self, epoch: int, loss: float, infomax: float) -> None:
        """Raise :class:`NonFiniteLossError` naming the first bad iteration when the window's loss is
        not finite (on any rank: the summed losses are NaN/inf on every rank, so all ranks raise)."""
        if math.isfinite(loss) and math.isfinite(infomax):
            return
        first = int(self.first_bad)
        if is_active():
            import torch.distributed as dist

            marker = torch.tensor([first if first >= 0 else 2**62], dtype=torch.int64, device=self.device)
            dist.all_reduce(marker, op=dist.ReduceOp.MIN)
            first = int(marker)
        what = "training loss" if not math.isfinite(loss) else "info-max loss"
        value = loss if not math.isfinite(loss) else infomax
        raise NonFiniteLossError(
            f"{what} is {value} at epoch {epoch} iteration {first + 1}: the run diverged (lower --lr, add "
            "--warmup, or check the data); no checkpoint was written for this epoch"
        )

    def totals(self) -> Dict[str, float]:
        """The window's sums over all ranks (collective under DDP) and this rank's times: what a mid-epoch
        checkpoint keeps of the epoch so far (plain floats)."""
        loss, infomax, correct, n = all_reduce_sum(self.sums.tolist(), self.device)
        return {"loss_sum": loss, "infomax_sum": infomax, "correct": correct, "samples": n,
                "data_time": self.data_time, "compute_time": self.compute_time, "batches": float(self.batches)}

    def restore(self, totals: Dict[str, float], owner: bool) -> None:
        """Start from a checkpoint's :meth:`totals`; the sums go to one rank (``owner``) only, since
        :meth:`flush` sums over ranks, the times (per rank) to every rank."""
        if owner:
            self.sums += torch.tensor([totals["loss_sum"], totals["infomax_sum"], totals["correct"],
                                       totals["samples"]], dtype=torch.float64, device=self.device)
        self.data_time += totals["data_time"]
        self.compute_time += totals["compute_time"]
        self.batches += int(totals["batches"])

    def flush(self) -> Dict[str, float]:
        """The window's metrics, summed over ranks (then :meth:`check_finite` on them)."""
        loss, infomax, correct, n = all_reduce_sum(self.sums.tolist(), self.device)
        n = max(n, 1.0)
        total_time = max(self.data_time + self.compute_time, 1e-9)
        metrics = {
            "train.loss": loss / n,
            "train.infomax": infomax / n,
            "train.top1": 100.0 * correct / n,
            "train.compute_ips": n / max(self.compute_time, 1e-9),
            "train.total_ips": n / total_time,
            "train.data_time": self.data_time / max(self.batches, 1),
            "train.compute_time": self.compute_time / max(self.batches, 1),
        }
        return metrics


def forward_loss(comp: TrainingSetup, cfg: LoopConfig, images: torch.Tensor, target: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one mini-batch (mixup, autocast): ``(loss, task loss, info-max loss, correct predictions)``, the
    loss being the task loss plus the weighted info-max term (PEDConv, BMVC 2021, Eq. 6)."""
    soft = target
    if comp.mixup is not None:
        images, soft = comp.mixup(images, target)
    with cfg.autocast():
        output = comp.model(images)
        task = comp.criterion(output, soft)
    term = infomax_loss(comp.module)
    infomax = term.float() if term is not None else torch.zeros((), device=task.device)
    loss = task + cfg.infomax_weight * infomax if term is not None else task
    correct = (output.detach().argmax(dim=1) == target).sum()
    return loss, task, infomax, correct


def backward(comp: TrainingSetup, cfg: LoopConfig, loss: torch.Tensor) -> None:
    """Backward of one mini-batch's share of an accumulated step (through the AMP grad scaler when there is one)."""
    scaled = loss / cfg.accumulation
    (comp.scaler.scale(scaled) if comp.scaler is not None else scaled).backward()


def optimizer_step(comp: TrainingSetup) -> None:
    """One optimizer step (through the grad scaler), gradients cleared, the LR schedule and the EMA advanced."""
    if comp.scaler is not None:
        comp.scaler.step(comp.optimizer)
        comp.scaler.update()
    else:
        comp.optimizer.step()
    comp.optimizer.zero_grad(set_to_none=True)
    comp.scheduler.step()
    if comp.ema is not None:
        comp.ema.update_parameters(comp.module)


def compile_ahead(comp: TrainingSetup, cfg: LoopConfig, train_shape: Optional[Tuple[int, ...]],
                  eval_shape: Tuple[int, ...]) -> None:
    """Run a ``torch.compile``-d model once per graph the run needs -- a training step (forward, loss, info-max,
    backward) at ``train_shape`` and a validation forward at ``eval_shape`` (the EMA model's too) -- on zeros,
    so that tracing and code generation happen now, in one place a signal may interrupt at once, instead of
    inside the first iteration and the first validation. Leaves no trace: BatchNorm statistics and every
    buffer restored, gradients cleared, global random streams unchanged, the train/eval mode as it was."""
    models = [module for _, module in comp.evaluated_models()]
    saved = [{name: b.detach().clone() for name, b in m.named_buffers()} for m in models]
    modes = [m.training for m in models]
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    devices = [cfg.device] if cfg.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if train_shape is not None:
                comp.module.train()
                images = torch.zeros(train_shape, device=cfg.device).contiguous(memory_format=fmt)
                target = torch.zeros(train_shape[0], dtype=torch.long, device=cfg.device)
                with cfg.autocast():
                    task = comp.criterion(comp.module(images), target)
                term = infomax_loss(comp.module)
                (task + cfg.infomax_weight * term.float() if term is not None else task).backward()
            # as validate() runs: inference mode, on a batch made outside it (the graph is specialised to both)
            images = torch.zeros(eval_shape, device=cfg.device).contiguous(memory_format=fmt)
            with torch.inference_mode():
                for model in models:
                    model.eval()
                    with cfg.autocast():
                        model(images)
    finally:
        with torch.no_grad():
            for model, buffers, mode in zip(models, saved, modes):
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
                model.train(mode)
        for p in comp.module.parameters():
            p.grad = None


def compile_ahead_or_eager(comp: TrainingSetup, cfg: LoopConfig, train_shape: Optional[Tuple[int, ...]],
                           eval_shape: Tuple[int, ...]) -> Optional[str]:
    """:func:`compile_ahead`, and where torch.compile cannot compile the model on this torch (a dynamo or backend
    error, e.g. an older dynamo that cannot trace a construct), the model and its EMA copy made eager again.

    Returns None when compiled, else one line saying why the run goes on eager. Errors of the model itself (those
    eager execution raises too) propagate."""
    try:
        compile_ahead(comp, cfg, train_shape, eval_shape)
    except Exception as exc:  # noqa: BLE001 (only compiler errors are answered; the rest propagate below)
        if not is_compiler_error(exc):
            raise
        for _, module in comp.evaluated_models():
            uncompile(module)
        import torch._dynamo

        torch._dynamo.reset()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return (f"torch.compile cannot compile this model on torch {torch.__version__} "
                f"({type(exc).__name__}: {first[:200]}); running eager")
    return None


def _train_step(comp: TrainingSetup, cfg: LoopConfig, images: torch.Tensor, target: torch.Tensor, boundary: bool):
    """Forward + backward of one mini-batch; the optimizer steps on accumulation boundaries only (DDP
    skips the gradient all-reduce on the other mini-batches)."""
    sync = contextlib.nullcontext()
    if not boundary and hasattr(comp.model, "no_sync"):
        sync = cast(Any, comp.model).no_sync()  # DDP's, also through a torch.compile wrapper
    with sync:
        loss, task, infomax, correct = forward_loss(comp, cfg, images, target)
        backward(comp, cfg, loss)
    lr = comp.optimizer.param_groups[0]["lr"]  # the lr this step uses
    if boundary:
        optimizer_step(comp)
    return task, infomax, correct, lr


def train_one_epoch(
    comp: TrainingSetup,
    cfg: LoopConfig,
    loader: BatchLoader,
    epoch: int,
    raport: RaportWriter,
    stop_requested: Callable[[], bool],
    start_iteration: int = 0,
    resumed_totals: Optional[Dict[str, float]] = None,
) -> EpochResult:
    """Train ``epoch`` from ``start_iteration`` (batches before it are drawn and skipped, so the data
    order equals an uninterrupted epoch). Stops early, at an optimizer-step boundary, when
    ``stop_requested()`` is true on any rank; the result then holds the epoch's totals so far.
    ``resumed_totals``: those of the interrupted run (its checkpoint's), so that the epoch summary covers
    the iterations before ``start_iteration`` too."""
    comp.model.train()
    total = cfg.iterations(len(loader))
    window, epoch_window = _Window(cfg.device), _Window(cfg.device)
    if start_iteration and resumed_totals is not None:
        epoch_window.restore(resumed_totals, owner=cfg.is_main)
    progress = Progress(f"Epoch {epoch} train", total, cfg.print_freq, enabled=cfg.is_main)
    if start_iteration:
        progress.update(start_iteration, {})
    done, interrupted, steps = start_iteration, False, 0
    group: List[Tuple[torch.Tensor, torch.Tensor]] = []  # adversarial training: the optimizer step's mini-batches
    group_data_time = 0.0
    end = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        if i >= total:
            break
        if i < start_iteration:
            end = time.perf_counter()
            continue
        images, target = cfg.to_device(images, target)
        data_time = time.perf_counter() - end
        boundary = (i + 1) % cfg.accumulation == 0 or i + 1 == total
        if comp.adversary is None:
            task, infomax, correct, lr = _train_step(comp, cfg, images, target, boundary)
            results = [(i, task, infomax, correct, images.shape[0])]
        else:  # free adversarial training replays the whole accumulation group: collect it first
            group.append((images, target))
            group_data_time += data_time
            if not boundary:
                end = time.perf_counter()
                continue
            per_batch, lr = comp.adversary.train_group(comp, cfg, group)
            results = [(i + 1 - len(group) + j, *values) for j, values in enumerate(per_batch)]
        compute_time = time.perf_counter() - end - data_time
        if comp.adversary is not None:
            data_time, group, group_data_time = group_data_time, [], 0.0
        for w in (window, epoch_window):
            for index, task, infomax, correct, n in results:
                w.add(task, infomax, correct, n, index)
            w.data_time += data_time
            w.compute_time += compute_time
        logged, done = done, i + 1
        if done // cfg.print_freq > logged // cfg.print_freq or done == total:
            metrics = window.flush()
            metrics["train.lr"] = lr
            raport.log((epoch, done), metrics)  # logged first: the raport shows the NaN that stops the run
            window.check_finite(epoch, metrics["train.loss"], metrics["train.infomax"])
            progress.update(done, {k: metrics[k] for k in ("train.loss", "train.top1", "train.total_ips")})
            window.reset()
        else:
            progress.tick(done)
        if boundary:
            steps += 1
            # under DDP the stop flag is all-reduced every few steps only (it costs a host sync)
            if (cfg.world_size == 1 or steps % _STOP_CHECK_EVERY == 0) and any_rank(stop_requested(), cfg.device):
                interrupted = done < total
                break
        end = time.perf_counter()
    summary = epoch_window.flush() if epoch_window.batches or cfg.world_size > 1 else {}
    if summary:
        epoch_window.check_finite(epoch, summary["train.loss"], summary["train.infomax"])
    progress.close({k: summary[k] for k in ("train.loss", "train.top1", "train.total_ips")} if summary else None,
                   stopped_at=done if interrupted else None)
    return EpochResult(done, interrupted, summary, epoch_window.totals() if interrupted else None)


@torch.inference_mode()
def validate(model: nn.Module, cfg: LoopConfig, loader: BatchLoader, criterion: nn.Module, prefix: str = "val",
             epoch: int = 0) -> Dict[str, float]:
    """Exact top-1/top-5/loss over the whole validation set (all ranks), plus compute throughput/latency."""
    model.eval()
    total = cfg.iterations(len(loader))
    sums = torch.zeros(4, dtype=torch.float64, device=cfg.device)  # loss*n, correct1, correct5, n
    latencies = []
    progress = Progress(f"Epoch {epoch} {prefix}", total, cfg.print_freq, enabled=cfg.is_main)
    batches = iter(loader)
    i = -1
    while True:
        i += 1
        # batches are made outside inference mode whatever the backend (in the loader's workers or, with -j 0,
        # here): the compiled eval graph, specialised to its input's dispatch keys, is then one for all. The
        # loader is read to its end as a for loop would (DALI's iterator resets on StopIteration).
        with torch.inference_mode(False):
            batch = next(batches, None)
        if batch is None or i >= total:
            break
        images, target = cfg.to_device(*batch)
        start = time.perf_counter()
        with cfg.autocast():
            output = model(images)
        loss = criterion(output.float(), target)
        if cfg.device.type == "cuda":
            torch.cuda.synchronize(cfg.device)
        latencies.append(time.perf_counter() - start)
        k = min(5, output.shape[1])
        top = output.topk(k, dim=1).indices
        hits = top == target[:, None]
        n = target.shape[0]
        sums += torch.stack([loss.double() * n, hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=cfg.device)])
        if (i + 1) % cfg.print_freq == 0 or i + 1 == total:
            progress.update(i + 1, {"loss": float(sums[0] / sums[3]), "top1": float(100 * sums[1] / sums[3])})
        else:
            progress.tick(i + 1)
    time_sum, count = all_reduce_sum([sum(latencies), len(latencies)], cfg.device)
    loss_sum, correct1, correct5, n = all_reduce_sum(sums.tolist(), cfg.device)
    n_safe = max(n, 1.0)
    ordered = sorted(latencies) or [0.0]
    metrics = {
        f"{prefix}.top1": 100.0 * correct1 / n_safe,
        f"{prefix}.top5": 100.0 * correct5 / n_safe,
        f"{prefix}.loss": loss_sum / n_safe,
        f"{prefix}.compute_ips": n / max(time_sum / max(cfg.world_size, 1), 1e-9),
        f"{prefix}.compute_latency": time_sum / max(count, 1.0),
        f"{prefix}.compute_latency_at95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        f"{prefix}.compute_latency_at99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        f"{prefix}.samples": n,
    }
    progress.close({k: metrics[k] for k in (f"{prefix}.loss", f"{prefix}.top1", f"{prefix}.top5")})
    return metrics


def check_finite_validation(metrics: Dict[str, float], prefix: str, epoch: int, evaluating: bool = False) -> None:
    """Raise :class:`NonFiniteLossError` when a validation pass produced a NaN/inf loss.

    Training stops on a non-finite training loss first, so a non-finite validation after a finite training
    epoch comes from the eval-mode forward (BatchNorm running statistics that do not fit the activations),
    and the message says so instead of blaming the learning rate."""
    loss = metrics.get(f"{prefix}.loss")
    if loss is not None and not math.isfinite(loss):
        model = "EMA model" if prefix.endswith("ema") else "model"
        if evaluating:
            raise NonFiniteLossError(
                f"validation loss of the {model} is {loss}: the checkpoint's eval-mode outputs are not finite on "
                "these images (its BatchNorm running statistics or weights do not fit them); top-1 is not reported"
            )
        raise NonFiniteLossError(
            f"validation loss of the {model} is {loss} after epoch {epoch} while its training loss stayed finite: "
            "the eval-mode forward diverges (BatchNorm running statistics that lag the weights); --precise-bn N "
            "recomputes them over N training batches before validating; not saved as the best model"
        )
