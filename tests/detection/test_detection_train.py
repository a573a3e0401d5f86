"""The detection training script end to end on a tiny synthetic COCO-layout set, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from image_classification.detection.coco import write_synthetic_coco
from image_classification.tools import train_detection as train
from image_classification.training.checkpoint import load_checkpoint
from image_classification.training.logger import raport_values, read_raport

TINY = ["--backbone", "resnet18", "--image-size", "257", "-b", "2", "--val-batch-size", "1", "--no-augment",
        "-j", "0", "-p", "1", "--lr", "0.002", "--lr-steps", "--seed", "0"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic_coco(str(tmp_path_factory.mktemp("coco")), train_images=2, val_images=1, size=160,
                                categories=3)


@pytest.mark.slow
def test_ssd_trains_with_loss_going_down_and_evaluates(coco: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    ws = tmp_path / "ws"
    assert train.main([coco, *TINY, "--iterations", "3", "--workspace", str(ws)]) == 0
    records = read_raport(ws / "raport.json")
    losses = [v for _, v in raport_values(records, "train.loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]  # one batch of the same two images: the loss goes down
    [(step, ap)] = raport_values(records, "val.AP")
    assert step == [3] and 0.0 <= ap <= 100.0 and raport_values(records, "val.APl")
    ckpt = load_checkpoint(ws / "checkpoint.pth.tar")
    assert (ckpt["task"], ckpt["arch"], ckpt["num_classes"], ckpt["iteration"]) == ("detection", "ssd300", 4, 3)
    assert train.main([coco, *TINY, "--evaluate", "--weights", str(ws / "checkpoint.pth.tar")]) == 0
    # a checkpoint of another operator is refused with one line
    assert train.main([coco, *TINY, "--conv", "pedconv", "--evaluate",
                       "--weights", str(ws / "checkpoint.pth.tar")]) == 2


@pytest.mark.parametrize("argv,message", [
    (["--image-size", "200"], "--image-size must be >= 257"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
    (["--lr-decay", "2"], "--lr-decay must be in (0, 1]"),
    (["--dynamic-parts", "heads"], "unknown SSD backbone part 'heads'"),
    (["--backbone", "vgg16"], "unknown backbone 'vgg16'"),
])
def test_bad_flags_one_line_exit_2(coco: str, tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    with pytest.raises(SystemExit) as exc:
        train.main([coco, *TINY, "--workspace", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_bad_data_and_checkpoint_one_line(coco: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main([str(tmp_path), *TINY, "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "instances_train2017.json" in err and not (tmp_path / "ws").exists()
    (tmp_path / "broken.pth.tar").write_bytes(b"not a checkpoint")
    assert train.main([coco, *TINY, "--evaluate", "--weights", str(tmp_path / "broken.pth.tar")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.pth.tar" in err
