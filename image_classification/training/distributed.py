"""Process-group setup and the few collectives the trainer needs.

One code path for every launch: ``python main.py`` (one process, no process group), ``torchrun`` /
``multiproc.py`` (``env://`` rendezvous from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``), and
SLURM's ``srun`` with one task per GPU, whose variables (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
``SLURM_LOCALID``, the step's node list) stand in for torchrun's when those are absent
(:func:`slurm_launch_environment`). The backend is NCCL when the processes compute on CUDA and gloo otherwise
(CPU DDP for tests and smoke runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Mapping, MutableMapping, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "env_world_size",
    "expand_hostlist",
    "slurm_launch_environment",
    "apply_slurm_environment",
    "align_gradient_strides",
    "init_distributed",
    "rendezvous",
    "RendezvousFailed",
    "RanksDisagree",
    "check_same_arguments",
    "run_defining_arguments",
    "cleanup",
    "barrier",
    "all_reduce_sum",
    "any_rank",
    "broadcast_int",
    "sync_buffers",
    "all_reduce_mean_",
    "is_active",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, local rank and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: MASTER_PORT under srun when the job does not set one: this base plus the job id modulo 20000, so that two jobs
#: sharing a first node do not collide (torchrun's default, 29500, would)
SLURM_PORT_BASE = 20000


def expand_hostlist(hostlist: str) -> List[str]:
    """SLURM's compressed host list as host names: ``"gpu[01-03,7],cpu5"`` -> gpu01 gpu02 gpu03 gpu7 cpu5
    (what ``scontrol show hostnames`` prints; zero padding kept, one bracket group per name)."""
    hosts: List[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", hostlist):
        prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not first.isdigit() or (last and not last.isdigit()):
                raise ValueError(f"malformed SLURM node list {hostlist!r}: {part!r} in brackets is not a number or a "
                                 f"range of numbers (as in node[01-04,07])")
            if not last:
                hosts.append(prefix + first + suffix)
                continue
            if int(last) < int(first):
                raise ValueError(f"malformed SLURM node list {hostlist!r}: the range {part!r} runs backwards")
            width = len(first)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(first), int(last) + 1))
    if not hosts:
        raise ValueError(f"malformed SLURM node list {hostlist!r}: no host name in it")
    return hosts


def _int_variable(environ: Mapping[str, str], name: str, minimum: int, below: Optional[int] = None,
                  below_name: str = "") -> int:
    """The integer value of environment variable ``name``; ValueError naming it when it is not an integer >=
    ``minimum`` (and < ``below``, the value of ``below_name``)."""
    raw = environ.get(name, "")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; the launcher (srun, torchrun) "
                         f"sets it: unset it to run one process") from None
    if value < minimum or (below is not None and value >= below):
        bound = f" and below {below_name}={below}" if below is not None else ""
        raise ValueError(f"environment variable {name}={value} is outside the job: it must be >= {minimum}{bound}")
    return value


def slurm_launch_environment(environ: Mapping[str, str] = os.environ) -> Optional[Dict[str, str]]:
    """torchrun's rendezvous variables from SLURM's, for a process that ``srun`` started (one task per GPU), or
    None where torchrun's are already set or srun did not start this process.

    ``SLURM_STEP_NUM_TASKS`` tells an srun task from the batch script itself (which sees the job's
    ``SLURM_NTASKS`` but is one process): ``python main.py`` straight in an sbatch script stays one process.
    MASTER_ADDR is the step's first node, MASTER_PORT the job's own unless set (:data:`SLURM_PORT_BASE`)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return None
    if environ.get("SLURM_STEP_NUM_TASKS") is None or environ.get("SLURM_PROCID") is None:
        return None
    # checked here, where they are still SLURM's names: a rank outside the job waited for peers that never come
    tasks = _int_variable(environ, "SLURM_STEP_NUM_TASKS", 1)
    rank = _int_variable(environ, "SLURM_PROCID", 0, tasks, "SLURM_STEP_NUM_TASKS")
    local_rank = _int_variable(environ, "SLURM_LOCALID", 0) if "SLURM_LOCALID" in environ else 0
    nodes = expand_hostlist(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost")
    job = int(re.sub(r"\D", "", environ.get("SLURM_JOB_ID", "0")) or 0)
    return {"RANK": str(rank), "WORLD_SIZE": str(tasks), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or nodes[0],
            "MASTER_PORT": environ.get("MASTER_PORT") or str(SLURM_PORT_BASE + job % 20000)}


def apply_slurm_environment(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set torchrun's variables from SLURM's where :func:`slurm_launch_environment` finds them; True if it did."""
    derived = slurm_launch_environment(environ)
    if derived is None:
        return False
    environ.update(derived)
    return True


def env_world_size() -> int:
    """World size announced by the launcher: torchrun's ``WORLD_SIZE``, else srun's (1 when started without one)."""
    apply_slurm_environment()
    return _int_variable(os.environ, "WORLD_SIZE", 1) if "WORLD_SIZE" in os.environ else 1


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available on this machine")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(requested)


def init_distributed(device: str = "auto", timeout_s: Optional[float] = None) -> DistEnv:
    """Initialise the default process group when launched by torchrun, and pick the device.

    ``timeout_s`` bounds every collective (``--dist-timeout``): a rank that waits longer for a stalled
    or lost peer raises instead of hanging for the backend's default (30 min for gloo).
    """
    apply_slurm_environment()  # srun's variables where torchrun's are absent
    environ = os.environ
    world_size = _int_variable(environ, "WORLD_SIZE", 1) if "WORLD_SIZE" in environ else 1
    rank = _int_variable(environ, "RANK", 0, world_size, "WORLD_SIZE") if "RANK" in environ else 0
    local_rank = _int_variable(environ, "LOCAL_RANK", 0) if "LOCAL_RANK" in environ else 0
    if world_size > 1 and "MASTER_PORT" in environ:
        _int_variable(environ, "MASTER_PORT", 1, 65536, "65536")
    store = None
    if world_size > 1 and not dist.is_initialized() and environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # torchrun's agent has started every worker; a plain env:// launch (srun, hand-set variables) may wait for
        # a rank that never comes: say so, and name it at the timeout (gloo/NCCL said '1/2 clients joined')
        store = rendezvous(environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", "29500")), rank,
                           world_size, 600.0 if timeout_s is None else float(timeout_s))
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        kwargs: Dict[str, Any] = {"device_id": torch_device} if torch_device.type == "cuda" else {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=float(timeout_s))
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, **kwargs)
        else:
            dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


class RendezvousFailed(ValueError):
    """The ranks of a job did not all meet at the rendezvous address (one line naming the missing ranks)."""


#: seconds between the 'waiting for ranks' lines of rank 0
RENDEZVOUS_REPORT_S = 10.0


def rendezvous(addr: str, port: int, rank: int, world_size: int, timeout_s: float,
               report_s: float = RENDEZVOUS_REPORT_S) -> dist.TCPStore:
    """Meet the other ranks at ``addr:port`` (rank 0 hosts the store) and return the store for the process group.

    Each rank registers itself; rank 0 says within seconds which ranks it waits for (then every ``report_s``) and,
    when ``timeout_s`` passes, raises :class:`RendezvousFailed` naming those that never came; the other ranks
    wait for rank 0's word that all are there. A rank that cannot reach rank 0's store says where it looked."""
    import time

    where = f"{addr}:{port}"
    try:
        # a client retrying until rank 0 is up makes c10d log every try with a C++ stack on stderr: said below
        with _native_stderr_silenced() if rank != 0 else contextlib.nullcontext():
            store = dist.TCPStore(addr, port, world_size, rank == 0, timeout=timedelta(seconds=timeout_s),
                                  wait_for_workers=False)
    except Exception as exc:  # DistNetworkError / RuntimeError: no master there, or the port is taken
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        role = "host the rendezvous" if rank == 0 else "reach rank 0's rendezvous"
        raise RendezvousFailed(f"rank {rank} of {world_size}: cannot {role} at {where} within {timeout_s:g} s "
                               f"({reason[:200]}); check MASTER_ADDR/MASTER_PORT and that rank 0 runs") from None
    store.set(f"pedconv_rendezvous/rank{rank}", "1")
    if rank != 0:
        try:
            store.wait(["pedconv_rendezvous/all"], timedelta(seconds=timeout_s))
        except Exception:
            raise RendezvousFailed(f"rank {rank} of {world_size}: rank 0 at {where} did not see every rank within "
                                   f"{timeout_s:g} s (its log names the missing ones)") from None
        return store
    started = time.monotonic()
    said = started
    first_report = min(2.0, report_s)
    while True:
        missing = [r for r in range(world_size) if not store.check([f"pedconv_rendezvous/rank{r}"])]
        if not missing:
            store.set("pedconv_rendezvous/all", "1")
            return store
        waited = time.monotonic() - started
        if waited >= timeout_s:
            raise RendezvousFailed(f"rank(s) {_ranks(missing)} of {world_size} never joined the rendezvous at {where} "
                                   f"within {timeout_s:g} s (--dist-timeout); start every rank (srun/torchrun, or "
                                   f"RANK 0..{world_size - 1}) or look at the missing ranks' logs")
        if time.monotonic() - said >= (first_report if said == started else report_s):
            print(f"main.py: waiting for rank(s) {_ranks(missing)} of {world_size} at {where} ({waited:.0f} s of "
                  f"{timeout_s:g} s)", file=sys.stderr, flush=True)
            said = time.monotonic()
        time.sleep(0.05)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null inside the block (C++ logging that Python cannot filter)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _ranks(ranks: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:16])
    return shown + (f" (and {len(ranks) - 16} more)" if len(ranks) > 16 else "")


def cleanup(all_ranks_here: bool = False) -> None:
    """Destroy the process group. ``all_ranks_here``: every rank reaches this call the same way (the run ended
    with status 0, or the ranks disagreed on their arguments): a barrier first, so they tear down together.

    Without it gloo on torch 2.6 blocks for ever in ``destroy_process_group`` now and then (2 runs in 12 here)
    when a peer has already torn down and exited; a barrier is only safe where no rank can be inside another
    collective, hence the flag."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if all_ranks_here and _active():
        dist.barrier()
    dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_active() -> bool:
    """True inside a process group of more than one rank."""
    return _active()


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list:
    """Sum a short list of numbers over all ranks (float64, one collective)."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not _active():
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_int(value: Optional[int], device: torch.device, src: int = 0) -> int:
    """Rank ``src``'s integer on every rank (used for a random seed all ranks must share)."""
    if not _active():
        return int(value or 0)
    tensor = torch.tensor([int(value or 0)], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=src)
    return int(tensor.item())


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last step every rank holds
    its own batch's statistics; validation and checkpoints must use one model, rank 0's.
    """
    if not _active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` in place by its mean over all ranks (a no-op in one process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def align_gradient_strides(model: torch.nn.Module) -> int:
    """Make every gradient arrive with its parameter's strides where they can differ only in name; returns how many
    parameters got a hook.

    A tensor with size-1 dimensions (a 1x1 kernel ``C_out x C_in x 1 x 1``, a depthwise kernel ``C x 1 x k x k``)
    has several stride tuples for one memory layout, and the operators' backwards pick one or another (a
    convolution's backward in channels_last, a matrix product viewed as a kernel). DDP's gradient buckets take the
    parameter's strides and compare them exactly: a mismatch copies the gradient every step and warns "Grad strides
    do not match bucket view strides" on every rank. The hook re-describes such a gradient with the parameter's
    strides (``as_strided`` of the same memory: no copy) when the strides differ in size-1 dimensions only."""
    count = 0
    for param in model.parameters():
        if not param.requires_grad or 1 not in param.shape:
            continue

        def _hook(grad: torch.Tensor, param: torch.Tensor = param) -> torch.Tensor:
            if grad.stride() == param.stride() or grad.shape != param.shape:
                return grad
            if all(g == p for g, p, size in zip(grad.stride(), param.stride(), grad.shape) if size != 1):
                return grad.as_strided(param.shape, param.stride(), grad.storage_offset())
            return grad

        param.register_hook(_hook)
        count += 1
    return count


class RanksDisagree(ValueError):
    """The ranks of one job were started with different run-defining arguments (exit status 2)."""


# arguments that may legitimately differ between ranks/nodes (paths on each node, local resources, logging)
PER_RANK_ARGUMENTS = frozenset({"data", "local_rank", "workers", "print_freq", "workspace", "raport_file", "config"})


def run_defining_arguments(args: Any) -> Dict[str, Any]:
    """The parsed arguments every rank must agree on, as JSON-able values."""
    return {key: value for key, value in sorted(vars(args).items()) if key not in PER_RANK_ARGUMENTS}


def _digest(values: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def check_same_arguments(values: Dict[str, Any], device: torch.device) -> None:
    """Compare ``values`` over all ranks (a hash first, the values only when they differ); raise
    :class:`RanksDisagree` on every rank, naming each differing argument and its value per rank."""
    if not _active():
        return
    digest = _digest(values)
    digests: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    everything: List[Optional[Dict[str, Any]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, values)
    keys = sorted({key for per_rank in everything for key in (per_rank or {})})
    differing = []
    for key in keys:
        seen = [(per_rank or {}).get(key) for per_rank in everything]
        if any(value != seen[0] for value in seen):
            shown = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(seen))
            differing.append(f"--{key.replace('_', '-')} ({shown})")
    raise RanksDisagree(
        f"ranks disagree on: {'; '.join(differing[:5])}{' ...' if len(differing) > 5 else ''}; start every rank "
        "with the same arguments"
    )
