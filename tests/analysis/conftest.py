"""Checkpoints of tiny classifiers (CIFAR ResNet-20 on 1-channel 28 px input, 10 classes) for the analysis CLIs."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from image_classification.models import build_model
from image_classification.training.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for conv in ("static", "pedconv", "dcd", "dyconv"):
        torch.manual_seed(0)
        model = build_model("cifar_resnet20", conv=conv, num_classes=10, in_chans=1)
        with torch.no_grad():  # spread PEDConv's sigmoid factors (N(0, 0.01) init) so they vary visibly
            for name, p in model.named_parameters():
                if "generator" in name:
                    p.mul_(30.0)
        save_checkpoint({"arch": "cifar_resnet20", "conv": conv, "placement": "paper", "num_classes": 10,
                         "in_chans": 1, "image_size": 28, "state_dict": model.state_dict(), "epoch": 1},
                        folder, f"{conv}.pth.tar")
        out[conv] = folder / f"{conv}.pth.tar"
    return out
