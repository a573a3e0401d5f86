"""python -m image_classification.tools.loader_benchmark: every usable backend timed on a real JPEG folder next to
the bare decode-and-crop loop, the pytorch backend's stages, the cores one GPU needs; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_classification.measurement.input_pipeline import cores_per_gpu, installed_backends
from image_classification.tools.loader_benchmark import main


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(8):
                pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg", quality=90)
    return root


def test_times_each_backend_against_the_bare_loop(jpeg_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(jpeg_root), "--images", "16", "-b", "4", "--image-size", "32", "-j", "0", "1", "--epochs", "1",
                 "--model-img-s", "3000"]) == 0
    out = capsys.readouterr().out
    assert "| pipeline | img/s | img/s per worker | per worker / bare loop | cores per GPU at 3000 img/s |" in out
    for backend in installed_backends():
        for workers in (0, 1):
            assert f"| {backend} -j {workers} |" in out
    assert "| bare decode + crop loop (1 process) |" in out and "1.00x" in out
    assert "pytorch backend per image, one process: decode " in out and "PIL decode" in out and "per GPU" in out
    assert cores_per_gpu(3000, 600) == 5.0


def test_bad_input_is_one_line(jpeg_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, needle in [([str(tmp_path)], "has no train/ folder"),
                         ([str(jpeg_root), "--backends", "nope"], "backend 'nope' cannot run here"),
                         ([str(jpeg_root), "--images", "0"], "--images: must be a positive integer, got 0"),
                         ([str(jpeg_root), "--model-img-s", "0"], "--model-img-s: must be > 0, got 0")]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and needle in err and err.count("\n") == 1, (argv, err)


def test_feed_a_training_step_from_sample_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--write-sample-images fills an empty DATA with ImageNet-sized JPEGs; --feed times a training step fed by each
    backend and by synthetic data (the GPU checks' stage, here on the CPU); --json keeps every figure."""
    import json

    data, report = tmp_path / "data", tmp_path / "loader.json"
    assert main([str(data), "--write-sample-images", "16", "--images", "16", "-b", "4", "--image-size", "32",
                 "-j", "0", "--epochs", "1", "--backends", "pytorch", "--feed", "resnet18", "--feed-seconds", "0.1",
                 "--device", "cpu", "--json", str(report)]) == 0
    files = sorted(data.glob("train/*/*.jpg"))
    assert len(files) == 16 and len(list(data.glob("val/*/*.jpg"))) == 8
    assert Image.open(files[0]).size == (500, 375) and 40_000 < files[0].stat().st_size < 150_000
    out = capsys.readouterr().out
    assert "| pipeline feeding a resnet18 training step | img/s | of synthetic data |" in out
    assert "| pytorch -j 0 |" in out and "| synthetic (on the device) |" in out
    saved = json.loads(report.read_text())
    assert [f["name"] for f in saved["feeds"]] == ["pytorch -j 0", "synthetic (on the device)"]
    assert all(f["img_s"] > 0 for f in saved["feeds"]) and saved["bare_loop"]["img_s"] > 0


def test_bad_feed_input_is_one_line(jpeg_root: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    cases = [([str(jpeg_root), "--feed", "nope"], "--feed: unknown architecture 'nope'"),
             ([str(jpeg_root), "--feed-seconds", "0"], "--feed-seconds: must be > 0, got 0"),
             ([str(jpeg_root), "--write-sample-images", "16"], "writes to a missing or empty folder"),
             ([str(jpeg_root), "--device", "tpu9"], "--device: 'tpu9' is not a device")]
    if not torch.cuda.is_available():
        cases.append(([str(jpeg_root), "--device", "cuda"], "--device cuda: no CUDA GPU is available here"))
    for argv, needle in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and needle in err and err.count("\n") == 1, (argv, err)
