"""training/build.py: the position a checkpoint records (epochs, iteration, the interrupted epoch's totals)."""

from __future__ import annotations

import pytest

from image_classification.training.build import checkpoint_position
from image_classification.training.checkpoint import CheckpointError

TOTALS = {"loss_sum": 4.5, "infomax_sum": 0.25, "correct": 3, "samples": 8, "data_time": 0.1, "compute_time": 0.2,
          "batches": 2}


def test_a_mid_epoch_checkpoint_gives_its_epoch_totals_back_as_floats() -> None:
    state = checkpoint_position({"epoch": 1, "step_in_epoch": 2, "epoch_totals": TOTALS})
    assert (state.epoch, state.step_in_epoch) == (1, 2)
    assert state.epoch_totals == {k: float(v) for k, v in TOTALS.items()}
    # an epoch-boundary checkpoint, or one of an earlier version without the field: no totals
    assert checkpoint_position({"epoch": 1, "step_in_epoch": 0, "epoch_totals": TOTALS}).epoch_totals is None
    assert checkpoint_position({"epoch": 1, "step_in_epoch": 2}).epoch_totals is None


@pytest.mark.parametrize("bad", [[1, 2], {**TOTALS, "samples": "8"}, {**TOTALS, "correct": True},
                                 {k: v for k, v in TOTALS.items() if k != "batches"}])
def test_malformed_epoch_totals_are_one_checkpoint_error(bad: object) -> None:
    with pytest.raises(CheckpointError, match="checkpoint field 'epoch_totals' must map loss_sum"):
        checkpoint_position({"epoch": 1, "step_in_epoch": 2, "epoch_totals": bad})


def test_a_mid_epoch_resume_compares_the_image_size_the_runs_use() -> None:
    """The refusal said '--image-size None -> 32' (an unset size against the dataset's), and an explicit
    '--image-size 28', Fashion-MNIST's own, was refused as a change."""
    import argparse

    import torch

    from image_classification.training.build import RunState, check_resume_position
    from image_classification.training.distributed import DistEnv

    saved = {"seed": 1, "train_subset": None, "image_size": None, "dataset": "fashion-mnist",
             "data_backend": "pytorch", "augmentation": "none", "interpolation": "bilinear", "batch_size": 4}
    checkpoint = {"args": saved, "world_size": 1}
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = RunState(epoch=1, step_in_epoch=2)
    for given in (None, 28):  # the dataset's own size, unset or explicit: the same run
        args = argparse.Namespace(**{**saved, "image_size": given, "dataset": None})
        check_resume_position(checkpoint, state, args, env, iterations=10)
    args = argparse.Namespace(**{**saved, "image_size": 32})
    with pytest.raises(CheckpointError, match=r"--image-size 28 -> 32"):
        check_resume_position(checkpoint, state, args, env, iterations=10)
