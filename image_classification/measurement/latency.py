"""Latency, training memory and peak RSS of a dynamic model against its static twin, measured in one run
(the profiler's ``--latency``; PEDConv appendix, Sec. B, Table 1). :func:`measure_latency` is the entry point;
``python -m image_classification.tools.profiler --help`` describes every figure it returns.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import autotune
from image_classification.dynamic.base import infomax_loss
from image_classification.models import build_model
from image_classification.progress import progress
from image_classification.timing import (
    AMP_DTYPES,
    autocast_context,
    interleaved_samples,
    memory_format,
    resolve_device,
)

from .memory import cuda_peak_bytes, training_memory

__all__ = ["LatencyConfig", "calibrate_batchnorm", "count_calls", "measure_latency", "peak_rss_training", "sgd_step"]


def sgd_step(model: Any, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              module: Optional[nn.Module] = None, amp: str = "none",
              scaler: Optional[Any] = None) -> Callable[[], None]:
    """One SGD step (loss incl. 1e-3 x info-max term) as a callable; ``model`` may be a compiled ``module``.
    ``amp``: autocast dtype; ``scaler``: a GradScaler (fp16)."""

    def step() -> None:
        with autocast_context(x.device, amp):
            loss = F.cross_entropy(model(x), y)
            extra = infomax_loss(module if module is not None else model)
            if extra is not None:
                loss = loss + 1e-3 * extra
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return step


def _grad_scaler(device: torch.device, amp: str) -> Optional[Any]:
    """A GradScaler for fp16 training on CUDA (as main.py --amp fp16), else None."""
    if amp != "fp16" or device.type != "cuda":
        return None
    return torch.amp.GradScaler("cuda")


def calibrate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to those of ``batches`` (train-mode forwards, no grad).

    An untrained network in eval mode keeps BN's initial statistics (mean 0, var 1), so activations
    shrink or grow layer after layer (e.g. by PEDConv's ~0.5^3 initial factors and BN gamma 0.5) until
    they are denormal floats, which CPUs process many times slower: latency would then measure the
    denormals, not the operator. A trained network has calibrated statistics; this gives both models that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


def _rss_bytes() -> Optional[int]:
    """Current resident set size (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: /proc/self/clear_refs = 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _rss_worker(job: Dict[str, Any]) -> Optional[float]:
    """In a fresh process: peak RSS above the post-import baseline over one training step (bytes).

    The model, its gradients, SGD momentum and everything the step allocates count; a first step
    creates the lazily allocated state, the peak is taken over the second.
    """

    torch.set_num_threads(job["threads"])
    autotune.CACHE.load_state_dict(job["cache"])
    autotune.set_autotune(False)  # the parent's choices (or the heuristic): no timing in here
    base = _rss_bytes()
    torch.manual_seed(job["seed"])
    model = build_model(job["arch"], job["conv"], job["placement"], num_classes=job["num_classes"],
                        in_chans=job["in_chans"]).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(job["seed"])
    x = torch.randn(job["batch"], job["in_chans"], job["image_size"], job["image_size"], generator=gen)
    y = torch.randint(0, job["num_classes"], (job["batch"],), generator=gen)
    step = sgd_step(model, opt, x, y)
    step()
    if base is None or not _reset_peak_rss():
        return None
    step()
    peak = _peak_rss_bytes()
    return None if peak is None else float(peak - base)


def peak_rss_training(arch: str, conv: str, placement: str, image_size: int, num_classes: int, in_chans: int,
                      batch: int, threads: int, seed: int = 0) -> Optional[float]:
    """Peak RSS (bytes above the interpreter's baseline) of a training step, measured in a spawned process
    so that no other model's freed memory is reused; None where /proc is unavailable. The process
    uses this process's tuned PEDConv paths."""
    import multiprocessing


    job = {"arch": arch, "conv": conv, "placement": placement, "image_size": image_size,
           "num_classes": num_classes, "in_chans": in_chans, "batch": batch, "threads": threads, "seed": seed,
           "cache": autotune.CACHE.state_dict()}
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_rss_worker, (job,))
    except (OSError, RuntimeError):  # pragma: no cover - no process spawning here
        return None


def _compiled(model: nn.Module, backend: str = "inductor", freezing: bool = False) -> nn.Module:
    """``torch.compile`` (static shapes); with ``freezing`` inductor's inference graphs fold the weights."""
    import torch._inductor.config as inductor_config

    # compiling a module gives a module (OptimizedModule); torch.compile's annotation covers functions too
    compiled = cast(nn.Module, torch.compile(model, backend=backend, dynamic=False))
    if not freezing:
        return compiled

    class _Frozen(nn.Module):  # compiles (on its first call) with inductor's freezing switched on
        def __init__(self) -> None:
            super().__init__()
            self.inner = compiled

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with inductor_config.patch(freezing=True):
                return self.inner(x)

    return _Frozen()


def count_calls(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Aten calls (seen by a ``TorchDispatchMode``) and Python function calls (``sys.setprofile`` "call"
    events, C functions not included) of one ``model(x)`` under inference mode, after one warm-up call
    (which fills the operators' caches); deterministic for a given model and input shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.calls += 1
            return func(*args, **(kwargs or {}))

    python = [0]

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            python[0] += 1

    with torch.inference_mode():
        model(x)
        with _Count():
            model(x)
        sys.setprofile(tracer)
        try:
            model(x)
        finally:
            sys.setprofile(None)
    return {"aten": _Count.calls, "python": python[0]}


def _frozen_copies(models: Dict[str, nn.Module]) -> Tuple[Dict[str, nn.Module], Dict[str, int]]:
    """Eval-mode copies of ``models`` with every conv + BatchNorm pair folded (both sides alike), and how
    many pairs each had folded."""
    import copy

    from image_classification.deployment.bn_folding import fold_batchnorm

    copies, folded = {}, {}
    for key, model in models.items():
        clone = copy.deepcopy(model).eval()
        folded[key] = len(fold_batchnorm(clone).folded)
        copies[key] = clone
    return copies, folded


def _time_inference(runners: Dict[str, Any], xs: Sequence[torch.Tensor], warmup: int, grad_context,
                    amp: str = "none", what: str = "batch-1 inference") -> Dict[str, float]:
    """Median ms per batch-1 inference of each runner, interleaved (alternating order); CUDA events on a GPU."""
    times: Dict[str, List[float]] = {k: [] for k in runners}
    with grad_context(), autocast_context(xs[0].device, amp):
        for i, x in progress(list(enumerate(xs)), f"timing {what} ({' and '.join(runners)}, interleaved, "
                             f"{warmup} warm-up)", unit="image"):
            # one round per image (a new input each time), the order alternating between images
            fns = {key: (lambda run=run, x=x: run(x)) for key, run in runners.items()}
            for key, samples in interleaved_samples(fns, x.device, 1, alternate=True, first_round=i).items():
                if i >= warmup:
                    times[key].extend(samples)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


@dataclass
class LatencyConfig:
    """What :func:`measure_latency` measures and how (its keyword arguments; see there)."""

    arch: str
    conv: str
    placement: str = "paper"
    image_size: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    threads: int = 2
    images: int = 200
    warmup: int = 20
    train_batch: int = 32
    train_steps: int = 8
    train_warmup: int = 2
    seed: int = 0
    compile: bool = False
    peak_rss: bool = False
    compile_backend: str = "inductor"
    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False


@dataclass
class _Bench:
    """The two models of a measurement and what every phase shares."""

    config: LatencyConfig
    device: torch.device
    models: Dict[str, nn.Module]
    generator: torch.Generator

    def batch_of(self, n: int) -> torch.Tensor:
        c = self.config
        x = torch.randn(n, c.in_chans, c.image_size, c.image_size, generator=self.generator)
        return x.to(self.device).contiguous(memory_format=memory_format(c.channels_last))


def measure_latency(arch: str, conv: str, **options: Any) -> Dict[str, Any]:
    """Interleaved measurements of ``conv`` vs the static model built the same way (ratios); the options are
    :class:`LatencyConfig`'s fields.

    ``device`` cpu/cuda/auto (CUDA-event timing on a GPU), ``amp`` none/fp16/bf16 (autocast; fp16
    training with a GradScaler), ``channels_last`` (models and inputs). On CUDA the peak allocated
    memory of a training step is added (``train_peak_mb_*``) and ``peak_rss`` is ignored.

    PEDConv ``path=auto`` layers are tuned first (for batch 1 and ``train_batch``) unless tuning is off;
    ``result["paths"]`` lists the path of every dynamic layer per input shape. ``compile``: both models run
    ``torch.compile``-d (inductor, static shapes) - batch-1 inference without and with inductor freezing
    (``infer_ratio`` / ``infer_ratio_frozen``) and the training step; the memory figures stay eager.
    ``peak_rss``: also the peak RSS of a training step of each model, each in a spawned process.
    """
    from image_classification.dynamic import path_report

    config = LatencyConfig(arch, conv, **options)
    bench = _build_models(config)
    dev = bench.device
    result: Dict[str, Any] = {"threads": config.threads, "images": config.images, "warmup": config.warmup,
                              "train_batch": config.train_batch, "train_steps": config.train_steps,
                              "compile": config.compile, "device": dev.type,
                              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                              "amp": config.amp, "channels_last": config.channels_last}
    _prepare_paths(bench)
    result.update(_measure_inference(bench))
    result.update(_measure_training(bench))
    if config.peak_rss and dev.type == "cpu":
        result.update(_measure_peak_rss(config))
    result["paths"] = path_report(bench.models["dynamic"])
    return result


def _build_models(config: LatencyConfig) -> _Bench:
    """The static and the dynamic model, seeded, on the device and in the layout asked for."""
    dev = resolve_device(config.device)
    if config.amp not in AMP_DTYPES:
        raise ValueError(f"--amp {config.amp!r}: expected one of {', '.join(AMP_DTYPES)}")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    c = config
    models = {"static": build_model(c.arch, "static", "paper", num_classes=c.num_classes, in_chans=c.in_chans),
              "dynamic": build_model(c.arch, c.conv, c.placement, num_classes=c.num_classes, in_chans=c.in_chans)}
    for m in models.values():
        m.to(dev).to(memory_format=memory_format(c.channels_last))
    return _Bench(config, dev, models, torch.Generator().manual_seed(c.seed))


def _prepare_paths(bench: _Bench) -> None:
    """Calibrate both models' BatchNorm statistics, then tune the dynamic model's PEDConv paths (the machine's path
    cache read first and written after, as main.py does)."""
    from image_classification.dynamic import auto_path_layers, reset_path_report
    from image_classification.dynamic.autotune import prepare_model

    c, dev, models = bench.config, bench.device, bench.models
    cache_file = autotune.default_cache_file(dev)  # the choices main.py made on this machine, and ours for it
    if autotune.autotune_enabled():
        autotune.load_cache_file(cache_file, dev)
    print(f"[latency] {c.arch} static and {c.conv}: calibrating BatchNorm statistics on 2 batches of 8",
          file=sys.stderr, flush=True)
    calibration = [bench.batch_of(8) for _ in range(2)]
    for m in models.values():
        calibrate_batchnorm(m, calibration)
    reset_path_report(models["dynamic"])  # the calibration forwards are not part of the measurement
    with autocast_context(dev, c.amp):
        prepare_model(models["dynamic"], train_shape=(c.train_batch, c.in_chans, c.image_size, c.image_size),
                      eval_shape=(1, c.in_chans, c.image_size, c.image_size), device=dev,
                      channels_last=c.channels_last, layers=auto_path_layers(models["dynamic"]), show=True)
    if autotune.autotune_enabled():
        autotune.save_cache_file(cache_file, dev)


def _measure_inference(bench: _Bench) -> Dict[str, Any]:
    """Batch-1 inference (``infer_ms_*``, ``infer_ratio``; compiled, also with frozen weights), and the aten and
    Python calls of one forward (eager, no AMP)."""
    c, models = bench.config, bench.models
    result: Dict[str, Any] = {}
    xs = [bench.batch_of(1) for _ in range(c.warmup + c.images)]
    if c.compile:
        torch._dynamo.reset()
        infer = _time_inference({k: _compiled(m, c.compile_backend) for k, m in models.items()}, xs, c.warmup,
                                torch.no_grad, c.amp, "compiled batch-1 inference (the first image compiles)")
        torch._dynamo.reset()
        folded_models, result["frozen_bn_folded"] = _frozen_copies(models)
        frozen = _time_inference({k: _compiled(m, c.compile_backend, freezing=True) for k, m in folded_models.items()},
                                 xs, c.warmup, torch.no_grad, c.amp, "frozen compiled batch-1 inference")
        del folded_models
        torch._dynamo.reset()
        for key in models:
            result[f"infer_ms_{key}_frozen"] = frozen[key]
        result["infer_ratio_frozen"] = frozen["dynamic"] / frozen["static"]
    else:
        infer = _time_inference(models, xs, c.warmup, torch.inference_mode, c.amp)
    if c.amp == "none":
        for key, model in models.items():
            result[f"calls_{key}"] = count_calls(model.eval(), xs[0])
    for key in models:
        result[f"infer_ms_{key}"] = infer[key]
    result["infer_ratio"] = result["infer_ms_dynamic"] / result["infer_ms_static"]
    return result


def _measure_training(bench: _Bench) -> Dict[str, Any]:
    """Training steps of both models, interleaved (alternating order, :func:`interleaved_samples`): time,
    throughput, training memory and, on CUDA, the peak allocation of a step."""
    c, dev, models = bench.config, bench.device, bench.models
    x = bench.batch_of(c.train_batch)
    y = torch.randint(0, c.num_classes, (c.train_batch,), generator=bench.generator).to(dev)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    scalers = {k: _grad_scaler(dev, c.amp) for k in models}
    steps = {k: sgd_step(_compiled(m, c.compile_backend) if c.compile else m, opts[k], x, y, m, c.amp, scalers[k])
             for k, m in models.items()}
    times: Dict[str, List[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
    for i in progress(range(c.train_warmup + c.train_steps), f"timing batch-{c.train_batch} training steps "
                      f"(static and dynamic, interleaved, {c.train_warmup} warm-up)", unit="step"):
        for key, samples in interleaved_samples(steps, dev, 1, alternate=True, first_round=i).items():
            if i >= c.train_warmup:
                times[key].extend(samples)
    result: Dict[str, Any] = {}
    for key in models:
        result[f"train_ms_{key}"] = 1e3 * statistics.median(times[key])
        result[f"train_img_s_{key}"] = c.train_batch / statistics.median(times[key])
        result[f"train_mem_mb_{key}"] = training_memory(models[key], x, y, c.amp) / 2**20
        if dev.type == "cuda":
            eager = sgd_step(models[key], opts[key], x, y, models[key], c.amp, scalers[key])
            result[f"train_peak_mb_{key}"] = cuda_peak_bytes(eager, dev) / 2**20
    result["train_ratio"] = result["train_ms_dynamic"] / result["train_ms_static"]
    result["throughput_ratio"] = result["train_img_s_dynamic"] / result["train_img_s_static"]
    result["memory_ratio"] = result["train_mem_mb_dynamic"] / result["train_mem_mb_static"]
    if dev.type == "cuda":
        result["peak_memory_ratio"] = result["train_peak_mb_dynamic"] / result["train_peak_mb_static"]
    return result


def _measure_peak_rss(config: LatencyConfig) -> Dict[str, Any]:
    """Peak RSS of a training step of each model, each in a fresh process (CPU)."""
    c = config
    result: Dict[str, Any] = {}
    for key, spec in progress((("static", "static"), ("dynamic", c.conv)), "peak RSS of a training step, each "
                              "model in a fresh process (--no-rss skips)", unit="model"):
        rss = peak_rss_training(c.arch, spec, "paper" if key == "static" else c.placement, c.image_size,
                                c.num_classes, c.in_chans, c.train_batch, c.threads, c.seed)
        result[f"rss_mb_{key}"] = None if rss is None else rss / 2**20
    if result["rss_mb_static"] and result["rss_mb_dynamic"] is not None:
        result["rss_ratio"] = result["rss_mb_dynamic"] / result["rss_mb_static"]
    return result
