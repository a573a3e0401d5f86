"""Semantic segmentation (PEDConv Table 3): PSPNet and UperNet heads on static or dynamic ResNet trunks, the
ADE20K folder reader, and the training script ``python -m image_classification.tools.train_segmentation``."""

from .models import SEGMENTERS, PSPNet, UperNet, build_segmenter, list_segmenters

__all__ = ["SEGMENTERS", "PSPNet", "UperNet", "build_segmenter", "list_segmenters"]
