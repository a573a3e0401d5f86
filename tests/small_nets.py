"""A small network with one of each convolution an operator may replace, shared by the BN-folding and export
tests: stem 3x3, 3x3 stride 2, 1x1 inside a residual branch, depthwise 3x3, 1x1 widening 8 -> 12; each conv is
followed by BatchNorm; then global average pooling and a 5-way classifier."""

from __future__ import annotations

import torch
import torch.nn as nn


class SmallConvNet(nn.Module):
    """``conv2_bias``: the residual 1x1 conv has a bias (BN folding must carry it)."""

    def __init__(self, conv2_bias: bool = False) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=conv2_bias), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))  # BN inside a residual branch, right after its conv: foldable
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))
