"""Run main.py and SIGKILL itself at a chosen moment (used by test_faults.py).

    python tests/training/kill_harness.py MOMENT N main.py-arguments...

MOMENT is where the process kills itself the N-th time it gets there (1-based):

* ``checkpoint-write``: half-way through writing a checkpoint (its temporary holds half the bytes);
* ``best-copy``: half-way through copying checkpoint.pth.tar to model_best.pth.tar;
* ``validation``: at the start of a validation pass;
* ``never``: does not kill (a plain main.py run).

This is what a preemption, the out-of-memory killer or a power cut does: no handler runs.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from image_classification.training import lifecycle, trainer  # noqa: E402
from image_classification.training.checkpoint import save as checkpoint  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    moment, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = {"n": 0}

    def reached() -> bool:
        calls["n"] += 1
        return calls["n"] == count

    if moment == "checkpoint-write":
        real_save = checkpoint.torch.save

        def save(obj, handle, *args, **kwargs):
            if not reached():
                return real_save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            _die()

        checkpoint.torch.save = save
    elif moment == "best-copy":
        real_copy = checkpoint.shutil.copyfile

        def copyfile(source, target, *args, **kwargs):
            if not reached() or not str(target).startswith(str(Path(target).parent / ".model_best")):
                return real_copy(source, target, *args, **kwargs)
            data = Path(source).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
            _die()

        checkpoint.shutil.copyfile = copyfile
    elif moment == "validation":
        real_validate = lifecycle.validate

        def validate(*args, **kwargs):
            if reached():
                _die()
            return real_validate(*args, **kwargs)

        lifecycle.validate = validate
    elif moment != "never":
        raise SystemExit(f"unknown moment {moment!r}")
    return trainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
