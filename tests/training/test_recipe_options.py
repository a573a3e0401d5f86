"""EfficientNet-B0's published recipe through main.py: --optimizer rmsprop, the exponential schedule,
--augmentation/--interpolation, --drop-path, --bn-momentum (issue 13, item 4)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torchvision.ops import StochasticDepth

from image_classification.training.build import build_network
from image_classification.training.checkpoint import load_checkpoint
from image_classification.training.distributed import DistEnv
from image_classification.training.logger import raport_values, read_raport
from image_classification.training.trainer import main

REPO = Path(__file__).resolve().parents[2]


def _args(**overrides: object) -> SimpleNamespace:
    """main.py's parsed defaults (the parser is their one home), with the fields these tests set."""
    from image_classification.training.cli import build_parser

    args = vars(build_parser().parse_args([]))
    args.update(arch="efficientnet_b0", placement="paper", num_classes=3)
    args.update(overrides)
    return SimpleNamespace(**args)


def test_drop_path_and_bn_momentum_reach_the_model() -> None:
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    loaders = SimpleNamespace(num_classes=3, in_chans=3)
    model = build_network(_args(drop_path=0.3, bn_momentum=0.01), "static", loaders, env)
    depth = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(depth) == 16 and depth[0] == 0.0 and depth[-1] == pytest.approx(0.3 * 15 / 16)  # block i: p * i / n
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    default = build_network(_args(), "static", loaders, env)
    assert max(m.p for m in default.modules() if isinstance(m, StochasticDepth)) == pytest.approx(0.2 * 15 / 16)
    assert {m.momentum for m in default.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


@pytest.mark.slow
def test_the_efficientnet_recipe_runs(jpeg_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    recipe = REPO / "configs" / "pedconv_table1" / "efficientnet_b0_static.yaml"
    argv = [str(jpeg_folder), "--config", str(recipe), "--image-size", "32", "-b", "2", "--optimizer-batch-size", "4",
            "-j", "0", "-p", "1", "--prof", "2", "--val-subset", "4", "--num-classes", "3", "--epochs", "6",
            "--run-epochs", "1", "--seed", "0", "--workspace", str(ws)]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    checkpoint = load_checkpoint(ws / "checkpoint.pth.tar")
    state = next(iter(checkpoint["optimizer"]["state"].values()))
    assert {"square_avg", "momentum_buffer"} <= set(state)  # TF-style RMSProp
    assert checkpoint["optimizer"]["param_groups"][0]["eps"] == 1e-3 and checkpoint["ema"] is not None
    records = read_raport(ws / "raport.json")
    params = records[0]["data"]
    assert (params["augmentation"], params["interpolation"], params["drop_path"], params["bn_momentum"]) == (
        "autoaugment", "bicubic", 0.2, 0.01)
    lrs = [lr for step, lr in raport_values(records, "train.lr") if len(step) == 2]
    # warmup over 5 epochs x 1 optimizer step (of 2 mini-batches)
    assert lrs == pytest.approx([0.032 / 5, 0.032 / 5])
    # resuming with another optimizer is refused in one line, nothing changed
    code = main([*argv[:-2], "--resume", "auto", "--optimizer", "sgd", "--workspace", str(ws)])
    assert code == 2 and "was trained with --optimizer rmsprop" in capsys.readouterr().err
    # an evaluation does not use the optimizer: any --optimizer may evaluate the checkpoint
    assert main([str(jpeg_folder), "--arch", "efficientnet_b0", "--image-size", "32", "-b", "4", "-j", "0",
                 "--num-classes", "3", "--evaluate", "--resume", str(ws / "checkpoint.pth.tar"),
                 "--workspace", str(tmp_path / "eval")]) == 0


def test_synthetic_data_says_augmentation_is_not_applied(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "-b", "2", "--prof", "1",
            "-j", "0", "--num-classes", "3", "--epochs", "1", "--augmentation", "randaugment", "--training-only",
            "--no-checkpoints", "--workspace", str(tmp_path / "ws")]
    assert main(argv) == 0
    assert "--data-backend synthetic has no images to augment; --augmentation randaugment is not applied" in \
        capsys.readouterr().err
