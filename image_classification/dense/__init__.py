"""Shared pieces of the dense-prediction tasks (detection, segmentation): ResNet trunks, head conversion, and
the iteration-based training loop of their training scripts."""

from .backbone import RESNET_TRUNKS, ResNetTrunk, build_resnet_trunk, convert_parts, stage_channels

__all__ = ["RESNET_TRUNKS", "ResNetTrunk", "build_resnet_trunk", "convert_parts", "stage_channels"]
