"""COCO layout reader, SSD augmentation, the pycocotools evaluation and one-line data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from image_classification.data import DataError
from image_classification.detection.coco import (
    CocoDetection,
    coco_evaluate,
    collate,
    ssd_train_transform,
    write_synthetic_coco,
)


def _coco(tmp_path: Path) -> str:
    return write_synthetic_coco(str(tmp_path / "coco"), train_images=3, val_images=2, size=96, categories=3)


def test_reader_boxes_labels_and_transform(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    ann = json.loads((tmp_path / "coco" / "annotations" / "instances_val2017.json").read_text())
    data = CocoDetection(root, "val2017")
    assert data.num_classes == 4 and data.category_ids == [1, 2, 3]
    image, target = data[0]
    first = [a for a in ann["annotations"] if a["image_id"] == target["image_id"]]
    x, y, w, h = first[0]["bbox"]
    assert image.shape == (3, 96, 96) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h] and int(target["labels"][0]) == first[0]["category_id"]
    augmented = CocoDetection(root, "train2017", ssd_train_transform(64))
    torch.manual_seed(0)
    for i in range(len(augmented)):
        image, target = augmented[i]
        assert image.shape == (3, 64, 64) and target["boxes"].shape[1] == 4
        assert bool((target["boxes"] >= 0).all() and (target["boxes"] <= 64).all())
    images, targets = collate([augmented[0], augmented[1]])
    assert len(images) == 2 and len(targets) == 2


def test_crowd_and_category_mapping(tmp_path: Path) -> None:
    root = tmp_path / "c"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    write_synthetic_coco(str(tmp_path / "src"), 1, 1, 64, 1)
    src = next((tmp_path / "src" / "val2017").glob("*.jpg"))
    (root / "val2017" / "a.jpg").write_bytes(src.read_bytes())
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 10], "iscrowd": 0},
                        {"id": 2, "image_id": 7, "category_id": 5, "bbox": [1, 2, 10, 10], "iscrowd": 1}],
        "categories": [{"id": 5, "name": "a"}, {"id": 90, "name": "b"}]}))
    data = CocoDetection(str(root), "val2017")
    _, target = data[0]
    assert data.category_ids == [5, 90] and target["labels"].tolist() == [2]  # crowd left out, ids -> 1..K


def test_coco_evaluation_perfect_and_empty(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    data = CocoDetection(root, "val2017")

    class Oracle(torch.nn.Module):
        def forward(self, images):
            outs = []
            for i, _ in enumerate(images):
                target = data[self.index + i][1]
                outs.append({"boxes": target["boxes"], "labels": target["labels"],
                             "scores": torch.ones(len(target["labels"]))})
            self.index += len(images)
            return outs

    oracle = Oracle()
    oracle.index = 0
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=collate)
    metrics = coco_evaluate(oracle, loader, torch.device("cpu"), data)
    assert set(metrics) == {"val.AP", "val.AP50", "val.AP75", "val.APs", "val.APm", "val.APl"}
    assert metrics["val.AP"] == pytest.approx(100.0) and metrics["val.AP50"] == pytest.approx(100.0)

    class Nothing(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0)} for _ in images]

    assert coco_evaluate(Nothing(), loader, torch.device("cpu"), data)["val.AP"] == 0.0


def test_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        CocoDetection(str(tmp_path / "none"), "val2017")
    root = _coco(tmp_path)
    with pytest.raises(DataError, match="instances_test2017.json"):
        CocoDetection(root, "test2017")
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        CocoDetection(root, "val2017")
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="has no 'annotations' list"):
        CocoDetection(root, "val2017")
    next((tmp_path / "coco" / "train2017").glob("*.jpg")).write_bytes(b"garbage")
    data = CocoDetection(root, "train2017")
    with pytest.raises(DataError, match="cannot read image"):
        for i in range(len(data)):
            data[i]


def test_synthetic_writer_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from image_classification.tools import synthetic_detection as synthetic

    assert synthetic.main([str(tmp_path / "s"), "--train", "1", "--val", "1", "--size", "64"]) == 0
    assert len(CocoDetection(str(tmp_path / "s"), "train2017")) == 1
    with pytest.raises(SystemExit) as exc:
        synthetic.main([str(tmp_path / "s"), "--categories", "9"])
    assert exc.value.code == 2 and "--categories must be in 1..6" in capsys.readouterr().err
