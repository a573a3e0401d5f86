"""Latency, training memory and peak RSS of a dynamic model against its static twin, measured in one run
(the profiler's ``--latency``; PEDConv appendix, Sec. B, Table 1). :func:`measure_latency` is the entry point;
``python -m image_classification.tools.profiler --help`` describes every figure it returns.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

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
    synchronize,
    time_calls,
)

__all__ = ["calibrate_batchnorm", "count_calls", "measure_latency", "peak_rss_training", "training_memory"]


def training_memory(model: nn.Module, batch: torch.Tensor, target: torch.Tensor, amp: str = "none") -> int:
    """Bytes of parameters + gradients + SGD momentum + tensors saved for backward (storage-deduplicated)."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(batch.device, amp):
        out = model(batch)
        loss = F.cross_entropy(out, target)
    loss.backward()
    model.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(seen.values()) + 3 * param_bytes


def _train_step(model: Any, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                module: Optional[nn.Module] = None, amp: str = "none", scaler: Optional[Any] = None) -> float:
    """One SGD step (loss incl. 1e-3 x info-max term); ``model`` may be a compiled ``module``. Seconds
    (CUDA events on a GPU). ``amp``: autocast dtype; ``scaler``: a GradScaler (fp16)."""

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

    return time_calls(step, x.device)


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
    _train_step(model, opt, x, y)
    if base is None or not _reset_peak_rss():
        return None
    _train_step(model, opt, x, y)
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


def measure_latency(arch: str, conv: str, placement: str = "paper", image_size: int = 224, num_classes: int = 1000,
                    in_chans: int = 3, threads: int = 2, images: int = 200, warmup: int = 20, train_batch: int = 32,
                    train_steps: int = 8, train_warmup: int = 2, seed: int = 0, compile: bool = False,
                    peak_rss: bool = False, compile_backend: str = "inductor", device: str = "cpu",
                    amp: str = "none", channels_last: bool = False) -> Dict[str, Any]:
    """Interleaved measurements of ``conv`` vs the static model built the same way (ratios).

    ``device`` cpu/cuda/auto (CUDA-event timing on a GPU), ``amp`` none/fp16/bf16 (autocast; fp16
    training with a GradScaler), ``channels_last`` (models and inputs). On CUDA the peak allocated
    memory of a training step is added (``train_peak_mb_*``) and ``peak_rss`` is ignored.

    PEDConv ``path=auto`` layers are tuned first (for batch 1 and ``train_batch``) unless tuning is off;
    ``result["paths"]`` lists the path of every dynamic layer per input shape. ``compile``: both models run
    ``torch.compile``-d (inductor, static shapes) - batch-1 inference without and with inductor freezing
    (``infer_ratio`` / ``infer_ratio_frozen``) and the training step; the memory figures stay eager.
    ``peak_rss``: also the peak RSS of a training step of each model, each in a spawned process.
    """
    from image_classification.dynamic import auto_path_layers, path_report, reset_path_report
    from image_classification.dynamic.autotune import prepare_model

    dev = resolve_device(device)
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp!r}: expected one of {', '.join(AMP_DTYPES)}")
    fmt = memory_format(channels_last)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    models = {"static": build_model(arch, "static", "paper", num_classes=num_classes, in_chans=in_chans),
              "dynamic": build_model(arch, conv, placement, num_classes=num_classes, in_chans=in_chans)}
    for m in models.values():
        m.to(dev).to(memory_format=fmt)
    gen = torch.Generator().manual_seed(seed)

    def batch_of(n: int) -> torch.Tensor:
        return torch.randn(n, in_chans, image_size, image_size, generator=gen).to(dev).contiguous(memory_format=fmt)

    result: Dict[str, Any] = {"threads": threads, "images": images, "warmup": warmup, "train_batch": train_batch,
                              "train_steps": train_steps, "compile": compile, "device": dev.type,
                              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                              "amp": amp, "channels_last": channels_last}

    cache_file = autotune.default_cache_file(dev)  # the choices main.py made on this machine, and ours for it
    if autotune.autotune_enabled():
        autotune.load_cache_file(cache_file, dev)
    print(f"profiler: {arch} static and {conv}: calibrating BatchNorm statistics on 2 batches of 8", file=sys.stderr,
          flush=True)
    calibration = [batch_of(8) for _ in range(2)]
    for m in models.values():
        calibrate_batchnorm(m, calibration)
    reset_path_report(models["dynamic"])  # the calibration forwards are not part of the measurement
    with autocast_context(dev, amp):
        prepare_model(models["dynamic"], train_shape=(train_batch, in_chans, image_size, image_size),
                      eval_shape=(1, in_chans, image_size, image_size), device=dev, channels_last=channels_last,
                      layers=auto_path_layers(models["dynamic"]), show=True)
    if autotune.autotune_enabled():
        autotune.save_cache_file(cache_file, dev)
    xs = [batch_of(1) for _ in range(warmup + images)]
    if compile:
        torch._dynamo.reset()
        infer = _time_inference({k: _compiled(m, compile_backend) for k, m in models.items()}, xs, warmup,
                                torch.no_grad, amp, "compiled batch-1 inference (the first image compiles)")
        torch._dynamo.reset()
        folded_models, result["frozen_bn_folded"] = _frozen_copies(models)
        frozen = _time_inference({k: _compiled(m, compile_backend, freezing=True) for k, m in folded_models.items()},
                                 xs, warmup, torch.no_grad, amp, "frozen compiled batch-1 inference")
        del folded_models
        torch._dynamo.reset()
        for key in models:
            result[f"infer_ms_{key}_frozen"] = frozen[key]
        result["infer_ratio_frozen"] = frozen["dynamic"] / frozen["static"]
    else:
        infer = _time_inference(models, xs, warmup, torch.inference_mode, amp)
    if amp == "none":
        for key, model in models.items():
            result[f"calls_{key}"] = count_calls(model.eval(), xs[0])
    for key in models:
        result[f"infer_ms_{key}"] = infer[key]
    result["infer_ratio"] = result["infer_ms_dynamic"] / result["infer_ms_static"]

    x = batch_of(train_batch)
    y = torch.randint(0, num_classes, (train_batch,), generator=gen).to(dev)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    scalers = {k: _grad_scaler(dev, amp) for k in models}
    runners = {k: (_compiled(m, compile_backend) if compile else m) for k, m in models.items()}
    steps: Dict[str, List[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
    for i in progress(range(train_warmup + train_steps), f"timing batch-{train_batch} training steps (static and "
                      f"dynamic, interleaved, {train_warmup} warm-up)", unit="step"):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for key in order:
            t = _train_step(runners[key], opts[key], x, y, models[key], amp, scalers[key])
            if i >= train_warmup:
                steps[key].append(t)
    for key in models:
        result[f"train_ms_{key}"] = 1e3 * statistics.median(steps[key])
        result[f"train_img_s_{key}"] = train_batch / statistics.median(steps[key])
        result[f"train_mem_mb_{key}"] = training_memory(models[key], x, y, amp) / 2**20
        if dev.type == "cuda":
            result[f"train_peak_mb_{key}"] = _cuda_peak_training_bytes(models[key], opts[key], x, y, amp,
                                                                       scalers[key]) / 2**20
    result["train_ratio"] = result["train_ms_dynamic"] / result["train_ms_static"]
    result["throughput_ratio"] = result["train_img_s_dynamic"] / result["train_img_s_static"]
    result["memory_ratio"] = result["train_mem_mb_dynamic"] / result["train_mem_mb_static"]
    if dev.type == "cuda":
        result["peak_memory_ratio"] = result["train_peak_mb_dynamic"] / result["train_peak_mb_static"]
    if peak_rss and dev.type == "cpu":
        for key, spec in progress((("static", "static"), ("dynamic", conv)), "peak RSS of a training step, each "
                                  "model in a fresh process (--no-rss skips)", unit="model"):
            rss = peak_rss_training(arch, spec, "paper" if key == "static" else placement, image_size, num_classes,
                                    in_chans, train_batch, threads, seed)
            result[f"rss_mb_{key}"] = None if rss is None else rss / 2**20
        if result["rss_mb_static"] and result["rss_mb_dynamic"] is not None:
            result["rss_ratio"] = result["rss_mb_dynamic"] / result["rss_mb_static"]
    result["paths"] = path_report(models["dynamic"])
    return result


def _cuda_peak_training_bytes(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                              amp: str, scaler: Optional[Any]) -> float:
    """Peak CUDA memory allocated during one eager training step, above what was allocated before it
    (parameters and optimizer state, allocated by the earlier steps, are included in neither)."""
    synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    _train_step(model, opt, x, y, model, amp, scaler)
    synchronize(x.device)
    return float(torch.cuda.max_memory_allocated(x.device) - base)


# --------------------------------------------------------------------------------------------- CLI
