"""Object detection (PEDConv Table 2): SSD300 with a static or dynamic ResNet backbone in torchvision's
detection API, the COCO folder reader and evaluator, and ``python -m image_classification.tools.train_detection``."""

from .ssd import COCO_NUM_CLASSES, PAPER_DYNAMIC_PARTS, DetectorFeatures, SSDResNetBackbone, build_ssd300

__all__ = ["COCO_NUM_CLASSES", "PAPER_DYNAMIC_PARTS", "DetectorFeatures", "SSDResNetBackbone", "build_ssd300"]
