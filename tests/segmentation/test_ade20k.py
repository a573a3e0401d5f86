"""ADE20K layout reader, label mapping, transforms, mean IoU, synthetic writer and one-line data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_classification.data import DataError
from image_classification.segmentation.ade20k import (
    ADE20K,
    IGNORE_INDEX,
    ConfusionMatrix,
    segmentation_transforms,
    write_synthetic_ade20k,
)


def test_reader_maps_labels_and_transforms(tmp_path: Path) -> None:
    root = write_synthetic_ade20k(str(tmp_path / "ade"), train_images=2, val_images=1, size=40, classes=3)
    raw = np.array(Image.open(next((tmp_path / "ade" / "annotations" / "training").glob("*.png"))))
    data = ADE20K(root, "training", num_classes=3)
    image, mask = data[0]
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32 and mask.dtype == torch.int64
    expected = torch.from_numpy(raw.astype(np.int64))
    expected = torch.where(expected == 0, torch.full_like(expected, IGNORE_INDEX), expected - 1)
    assert torch.equal(mask, expected)  # 0 -> ignore, k -> k - 1
    train_tf, val_tf = segmentation_transforms(crop=48, scales=[30, 60], max_size=100, val_size=20)
    image, mask = ADE20K(root, "training", train_tf, num_classes=3)[1]
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    image, mask = ADE20K(root, "validation", val_tf, num_classes=3)[0]
    assert image.shape[-2:] == (20, 20) == mask.shape


def test_confusion_matrix_mean_iou() -> None:
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 0]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm.update(prediction, target)
    # class 0: tp 2, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    metrics = cm.metrics()
    assert metrics["val.mIoU"] == pytest.approx(100 * (0.5 + 2 / 3 + 0.5) / 3)
    assert metrics["val.pixel_acc"] == pytest.approx(100 * 5 / 7)


def test_data_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ADE20K(str(tmp_path / "missing"), "training")
    root = write_synthetic_ade20k(str(tmp_path / "ade"), train_images=2, val_images=1, size=32, classes=4)
    with pytest.raises(DataError, match="missing .*images/testing"):
        ADE20K(root, "testing")
    next((tmp_path / "ade" / "annotations" / "training").glob("*.png")).unlink()
    with pytest.raises(DataError, match="no annotation PNG for 1 image"):
        ADE20K(root, "training")
    with pytest.raises(DataError, match="label 4 > 3 classes"):
        data = ADE20K(root, "validation", num_classes=3)
        for i in range(len(data)):
            data[i]


def test_synthetic_writer_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from image_classification.tools import synthetic_segmentation as synthetic

    assert synthetic.main([str(tmp_path / "s"), "--train", "1", "--val", "1", "--size", "32"]) == 0
    assert len(ADE20K(str(tmp_path / "s"), "validation")) == 1
    with pytest.raises(SystemExit) as exc:
        synthetic.main([str(tmp_path / "s"), "--size", "4"])
    assert exc.value.code == 2 and "--size must be >= 16" in capsys.readouterr().err
