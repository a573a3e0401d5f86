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
