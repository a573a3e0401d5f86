"""The segmentation training script end to end on a tiny synthetic ADE20K-layout set, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from script_runner import run_script

from image_classification.segmentation.ade20k import write_synthetic_ade20k
from image_classification.tools import train_segmentation as train
from image_classification.training.checkpoint import load_checkpoint
from image_classification.training.logger import raport_values, read_raport

REPO = Path(__file__).resolve().parents[2]
TINY = ["--backbone", "resnet18", "--head-channels", "32", "--num-classes", "4", "-b", "2", "--crop-size", "32",
        "--val-size", "32",
        "--no-augment", "-j", "0", "-p", "1", "--lr", "0.01", "--seed", "0"]


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic_ade20k(str(tmp_path_factory.mktemp("ade")), train_images=2, val_images=2, size=48,
                                  classes=4)


@pytest.mark.slow
def test_pspnet_pedconv_trains_resumes_and_evaluates(ade: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    ws = tmp_path / "ws"
    common = [ade, "--arch", "pspnet", "--conv", "pedconv", *TINY, "--workspace", str(ws)]
    assert train.main([*common, "--iterations", "3", "--eval-every", "0"]) == 0
    records = read_raport(ws / "raport.json")
    losses = [v for _, v in raport_values(records, "train.loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the same batch every iteration: the loss goes down
    assert raport_values(records, "train.infomax") and raport_values(records, "train.aux")
    [(_, miou)] = raport_values(records, "val.mIoU")
    assert 0.0 <= miou <= 100.0
    ckpt = load_checkpoint(ws / "checkpoint.pth.tar")
    assert (ckpt["task"], ckpt["arch"], ckpt["conv"], ckpt["iteration"]) == ("segmentation", "pspnet", "pedconv", 3)
    assert (ws / "model_best.pth.tar").is_file()
    # resume: one more iteration continues the schedule and the raport
    assert train.main([*common, "--iterations", "4", "--resume", "auto", "--no-eval"]) == 0
    steps = [s for s, _ in raport_values(read_raport(ws / "raport.json"), "train.loss")]
    assert steps[-2:] == [[3], [4]] and load_checkpoint(ws / "checkpoint.pth.tar")["iteration"] == 4
    # evaluation only, from the best checkpoint
    assert train.main([ade, "--arch", "pspnet", "--conv", "pedconv", *TINY, "--evaluate",
                       "--weights", str(ws / "model_best.pth.tar")]) == 0


@pytest.mark.slow
def test_upernet_static_loss_goes_down(ade: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    ws = tmp_path / "ws"
    assert train.main([ade, "--arch", "upernet", *TINY, "--iterations", "3", "--no-eval", "--workspace", str(ws)]) == 0
    losses = [v for _, v in raport_values(read_raport(ws / "raport.json"), "train.loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.parametrize("argv,message", [
    (["--iterations", "0"], "--iterations: must be a positive integer, got 0"),
    (["--arch", "deeplab"], "unknown --arch 'deeplab'"),
    (["--conv", "nope"], "unknown operator"),
    (["--num-classes", "300"], "--num-classes must be < 255"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--evaluate"], "--evaluate needs --weights"),
    (["--dynamic-parts", "aux"], "unknown pspnet part 'aux'"),
])
def test_bad_flags_one_line_exit_2(ade: str, tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    with pytest.raises(SystemExit) as exc:
        train.main([ade, *TINY, "--workspace", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_bad_data_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main([str(tmp_path / "nothing"), *TINY, "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"{train.PROG}: error: DATA directory")
    assert not (tmp_path / "ws").exists()  # nothing written on bad input
    (tmp_path / "bad.yaml").write_text("learning-rate: 3\n")
    with pytest.raises(SystemExit):
        train.main([str(tmp_path), "--config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert "unknown key(s) in --config" in err and err.rstrip().endswith("learning-rate (see --help)")


@pytest.mark.slow
def test_cli_entry_point(tmp_path: Path) -> None:
    proc = run_script("image_classification.tools.train_segmentation", [str(tmp_path / "x")], module=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "error:" in proc.stderr


def test_loss_of_a_crop_without_labels_is_zero_not_nan() -> None:
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    masks = torch.full((2, 3, 3), 255, dtype=torch.int64)
    loss = train.pixel_cross_entropy(logits, masks)
    assert float(loss.detach()) == 0.0
    loss.backward()
    masks[0, 0, 0] = 2
    ref = torch.nn.functional.cross_entropy(logits[:1, :, :1, :1], masks[:1, :1, :1])
    torch.testing.assert_close(train.pixel_cross_entropy(logits, masks), ref)
