"""The raport's scalars as TensorBoard event files: live from ``main.py --tensorboard``, or afterwards from a raport
(``python -m image_classification.tools.raport_to_tensorboard``). Both map a raport record the same way:

- an iteration record (step ``[epoch, iteration]``, every ``--print-freq`` iterations): each number under its own
  name with ``/`` for ``.`` (``train.loss`` -> ``train/loss``, ``train.lr``, ``train.total_ips``,
  ``train.infomax``), at the global iteration ``epoch * iterations_per_epoch + iteration``;
- an epoch record (step ``[epoch]``: the epoch's training summary and validation): ``epoch/<name>``
  (``epoch/train.loss``, ``epoch/val.top1``, ``epoch/val.top5``, ``epoch/val_ema.top1``) at step ``epoch``;
- the arguments (step ``"PARAMETER"``) as one text entry; the final summary is not repeated.

A resumed run logs the same steps the interrupted one would have, so its curves continue where they stopped.
``tensorboard`` is an optional package: :func:`require_tensorboard` says how to install it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

__all__ = ["RUN_MARKER", "TensorBoardScalars", "event_files", "foreign_run", "iterations_per_epoch",
           "remove_event_files", "require_tensorboard", "scalar_entries"]

#: a file in a ``--tensorboard`` folder naming the raport its event files belong to (TensorBoard ignores it): a
#: second run pointed at the same folder would otherwise add its curves to the first one's (steps 1, 1, 2, 2)
RUN_MARKER = ".pedconv-run"


def event_files(logdir: Union[str, os.PathLike]) -> List[str]:
    """The TensorBoard event files directly in ``logdir`` (none when it does not exist)."""
    if not os.path.isdir(logdir):
        return []
    return sorted(name for name in os.listdir(logdir) if name.startswith("events.out.tfevents."))


def foreign_run(logdir: Union[str, os.PathLike], owner: str) -> Optional[str]:
    """What other run's event files ``logdir`` holds (the raport its marker names, or ``an unknown run``), or None
    when it holds none or only ``owner``'s."""
    if not event_files(logdir):
        return None
    try:
        with open(os.path.join(logdir, RUN_MARKER), encoding="utf-8") as f:
            marked = f.read().strip()
    except OSError:
        return "an unknown run (no marker)"
    return None if marked == owner else f"the run of {marked}"


def remove_event_files(logdir: Union[str, os.PathLike]) -> int:
    """Delete the event files directly in ``logdir`` (an overwritten run's curves); returns how many."""
    names = event_files(logdir)
    for name in names:
        os.unlink(os.path.join(logdir, name))
    return len(names)

Step = Union[str, Sequence[int]]


def require_tensorboard(purpose: str = "--tensorboard") -> None:
    """Raise ImportError in one line naming ``pip install tensorboard`` when the package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ImportError(f"{purpose} needs the optional package tensorboard: pip install tensorboard") from None


def scalar_entries(step: Step, data: Dict[str, Any], per_epoch: int) -> List[tuple]:
    """``(tag, value, global_step)`` of one raport record's numbers (see the module docstring)."""
    if isinstance(step, str) or len(step) not in (1, 2):
        return []
    numbers = {k: float(v) for k, v in data.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if len(step) == 2:
        epoch, iteration = int(step[0]), int(step[1])
        return [(name.replace(".", "/", 1), value, epoch * per_epoch + iteration) for name, value in numbers.items()]
    return [(f"epoch/{name}", value, int(step[0])) for name, value in numbers.items()]


def iterations_per_epoch(records: Iterable[Dict[str, Any]]) -> int:
    """The epoch length a raport implies: the largest iteration number of its iteration records (the last
    iteration of an epoch is always logged), at least 1."""
    longest = 0
    for record in records:
        step = record.get("step")
        if record.get("type") == "LOG" and isinstance(step, list) and len(step) == 2:
            longest = max(longest, int(step[1]))
    return max(1, longest)


class TensorBoardScalars:
    """A TensorBoard event-file writer for raport records: :meth:`log` takes what ``RaportWriter.log`` takes.

    Flushed after every epoch record and on :meth:`close`, so a run stopped by a signal (whose raport is closed
    on the way out) leaves its curves complete up to the save."""

    def __init__(self, logdir: Union[str, os.PathLike], per_epoch: int, owner: Optional[str] = None) -> None:
        """``owner``: the raport these curves belong to, written to :data:`RUN_MARKER` in ``logdir``."""
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = str(logdir)
        self.per_epoch = max(1, int(per_epoch))
        self._writer: Optional[Any] = SummaryWriter(self.logdir)
        if owner is not None:
            from image_classification.atomic_files import replaced_atomically

            with replaced_atomically(os.path.join(self.logdir, RUN_MARKER)) as tmp:
                tmp.write_text(owner + "\n", encoding="utf-8")

    def log(self, step: Step, data: Dict[str, Any]) -> None:
        if self._writer is None:
            return
        if step == "PARAMETER":
            text = json.dumps(data, indent=1, sort_keys=True, default=str)
            self._writer.add_text("parameters", f"```\n{text}\n```", 0)
            return
        for tag, value, global_step in scalar_entries(step, data, self.per_epoch):
            self._writer.add_scalar(tag, value, global_step)
        if not isinstance(step, str) and len(step) == 1:
            self._writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
