"""DeepLearningExamples-compatible launcher: ``python multiproc.py --nproc_per_node 8 main.py DATA ...``.

Keeps DeepLearningExamples' arguments (``--nnodes --node_rank --nproc_per_node --master_addr
--master_port``) and hands over to ``torch.distributed.run`` (torchrun), which starts one process per GPU
(or per requested process on CPU) with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` set. On one node
without ``--master_addr`` it runs torchrun ``--standalone`` (a free local port, no clashes between jobs).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional, Sequence

from image_classification.argparsing import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="multiproc.py",
        description="Start N training processes per node through torch.distributed.run (torchrun).",
    )
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--node_rank", "--node-rank", dest="node_rank", type=int, default=0,
                        help="rank of this node, 0 .. nnodes-1 (default: 0)")
    parser.add_argument("--nproc_per_node", "--nproc-per-node", dest="nproc_per_node", type=int, default=1,
                        help="processes on this node, usually one per GPU (default: 1)")
    parser.add_argument("--master_addr", "--master-addr", dest="master_addr", default=None,
                        help="address of the node with rank 0 (required with --nnodes > 1)")
    parser.add_argument("--master_port", "--master-port", dest="master_port", type=int, default=None,
                        help="free port on the master node (default: 29500 when --master_addr is given)")
    parser.add_argument("training_script", help="the training program, e.g. main.py")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def torchrun_args(args: argparse.Namespace) -> List[str]:
    """Translate DeepLearningExamples' launcher arguments into torch.distributed.run's."""
    for name in ("nnodes", "nproc_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node_rank {args.node_rank} is not in 0..{args.nnodes - 1}")
    out = ["--nnodes", str(args.nnodes), "--nproc_per_node", str(args.nproc_per_node)]
    if args.master_addr is None and args.master_port is None:
        if args.nnodes > 1:
            raise ValueError("--master_addr is required with --nnodes > 1")
        out.append("--standalone")
    else:
        out += ["--node_rank", str(args.node_rank), "--master_addr", args.master_addr or "127.0.0.1",
                "--master_port", str(args.master_port or 29500)]
    return out + [args.training_script, *args.training_script_args]


def exit_status(exc: Any) -> int:
    """The exit status of the job that failed with torchrun's ``ChildFailedError``: the first worker to fail
    (the root cause; the others were stopped because of it, or failed because they lost it), as a shell
    reports it: its own status (2 = bad input, 3 = diverged, ...) or 128 + N when signal N killed it."""
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return 1
    # timestamps have 1 s resolution: within a second prefer a specific status over the generic 1 of a rank
    # that only lost its peer
    first = min(failures.values(),
                key=lambda failure: (getattr(failure, "timestamp", 0), failure.exitcode == 1, failure.local_rank))
    code = first.exitcode
    if not isinstance(code, int) or code == 0:
        return 1
    if code < 0:  # killed by a signal (SIGKILL: the out-of-memory killer) -> 137, as a shell says it
        return min(255, 128 - code)
    return code if code < 256 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        translated = torchrun_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.training_script.startswith("-") and not os.path.isfile(args.training_script):
        # checked here: every worker would fail on its own and torchrun add its multi-line failure report
        parser.error(f"training script {args.training_script} not found (from {os.getcwd()}); give its path, e.g. "
                     "main.py in this repository's root")
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if not torch.cuda.is_available():
        print(f"multiproc.py: note: no CUDA device here: the {args.nproc_per_node} process(es) on this node train on "
              "the CPU (gloo), sharing its cores", file=sys.stderr, flush=True)

    try:
        torchrun_main(translated)
    except ChildFailedError as exc:
        return exit_status(exc)
    except RuntimeError as exc:  # the rendezvous store cannot listen or connect
        # torch >= 2.7 raises DistNetworkError; 2.6 a plain RuntimeError with the same EADDRINUSE text
        text = " ".join(str(exc).split())
        in_use = "EADDRINUSE" in text or "address already in use" in text
        if not (in_use or isinstance(exc, getattr(torch.distributed, "DistNetworkError", ()))):
            raise
        if in_use:
            port, host = args.master_port or 29500, args.master_addr or "127.0.0.1"
            parser.exit(2, f"multiproc.py: error: port {port} on {host} is in use (another job on this node?): give "
                        "another --master_port\n")
        parser.exit(2, f"multiproc.py: error: the rendezvous failed: {text[:300]} (check --master_addr and "
                    "--master_port)\n")
    except SignalException as exc:  # SIGTERM/SIGINT: torchrun forwarded it; the workers checkpointed and exited
        print(f"multiproc.py: stopped by signal {int(exc.sigval)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
