"""Single-image inference end to end: a checkpoint and PNGs made here, top-k output, validation
preprocessing, class names, and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_runner import run_script
from torchvision.transforms.v2.functional import pil_to_tensor

from image_classification.data import DataConfig, DataError
from image_classification.data.imagefolder import imagenet_normalizer, imagenet_transforms
from image_classification.data.small import FASHION_MNIST_CLASSES, InMemoryLoader
from image_classification.deployment.inference import load_inference_model, preprocess_images
from image_classification.models import build_model
from image_classification.tools.classify import classify_images, main

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(tmp_path: Path, conv: str = "odconv", dataset: str = "fashion-mnist", in_chans: int = 1,
                size: int = 28, arch: str = "cifar_resnet20") -> Path:
    torch.manual_seed(0)
    model = build_model(arch, conv, num_classes=10, in_chans=in_chans)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"arch": arch, "conv": conv, "placement": "paper", "num_classes": 10, "in_chans": in_chans,
                "image_size": size, "state_dict": model.state_dict(), "args": {"dataset": dataset}}, path)
    return path


def _png(path: Path, shape: tuple, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def test_end_to_end_topk_and_json(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path)
    a, b = _png(tmp_path / "a.png", (28, 28)), _png(tmp_path / "b.png", (40, 30, 3), seed=1)
    assert main([str(ckpt), str(a), str(b), "--topk", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(a) and lines[4] == str(b) and len(lines) == 8
    assert all(any(name in line for name in FASHION_MNIST_CLASSES) for line in lines[1:4])
    assert main([str(ckpt), str(a), "--json", "--topk", "10", "-b", "1"]) == 0
    record = json.loads(capsys.readouterr().out)
    probs = [t["probability"] for t in record["top"]]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    assert {t["name"] for t in record["top"]} == set(FASHION_MNIST_CLASSES)


def test_predictions_equal_the_model_on_validation_inputs(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    paths = [str(_png(tmp_path / f"{i}.png", (28, 28), seed=i)) for i in range(3)]
    loaded = load_inference_model(str(ckpt))
    assert loaded.model.training is False and (loaded.arch, loaded.image_size, loaded.dataset) == (
        "cifar_resnet20", 28, "fashion-mnist")
    # the Fashion-MNIST loader's validation transform on the same pixels
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in paths]).unsqueeze(1)
    loader = InMemoryLoader(pixels, torch.zeros(3, dtype=torch.long), train=False, batch_size=3, rank=0, world_size=1,
                            seed=0, drop_last=False, augment=False, crop_padding=2, flip=False, mean=(0.2860,),
                            std=(0.3530,), in_chans=1, image_size=28, device=torch.device("cpu"),
                            memory_format=torch.contiguous_format)
    expected_input, _ = next(iter(loader))
    batch = preprocess_images(paths, "fashion-mnist", 28, 1)
    torch.testing.assert_close(batch, expected_input)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(batch), 1)
    results = classify_images(loaded.model, paths, "fashion-mnist", 28, 1, None, topk=2, batch_size=2)
    for row, result in zip(probs, results):
        values, indices = row.topk(2)
        assert result.indices == indices.tolist() and result.names == [str(i) for i in indices.tolist()]
        assert result.probabilities == pytest.approx(values.tolist(), abs=1e-6)


def test_imagenet_preprocessing_is_the_validation_transform(tmp_path: Path) -> None:
    path = _png(tmp_path / "photo.png", (300, 260, 3))
    batch = preprocess_images([str(path)], "imagenet", 64, 3)
    cfg = DataConfig(dataset="imagenet", image_size=64, augment=False)
    _, val = imagenet_transforms(cfg)
    expected = imagenet_normalizer(cfg)(val(pil_to_tensor(Image.open(path).convert("RGB")))[None])
    torch.testing.assert_close(batch, expected)
    assert batch.shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_class_names_file_and_root_script(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, conv="static", dataset="cifar10", in_chans=3, size=32)
    image = _png(tmp_path / "x.png", (32, 32, 3))
    names = tmp_path / "names.txt"
    names.write_text("# my classes\n" + "\n".join(f"thing{i}" for i in range(10)) + "\n")
    run = run_script(str(ROOT / "classify.py"), [str(ckpt), str(image), "--class-names", str(names), "--topk", "1"],
                     cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == str(image) and "thing" in run.stdout.splitlines()[1]


@pytest.mark.parametrize("case", ["bad image", "missing image", "bad checkpoint", "short names", "no arch"])
def test_errors_are_one_line_exit_2(case: str, tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path)
    image = _png(tmp_path / "ok.png", (28, 28))
    args = [str(ckpt), str(image)]
    expected = {"bad image": "cannot read image", "missing image": "not found",
                "bad checkpoint": "cannot read checkpoint", "short names": "has 2 names, the model has 10",
                "no arch": "records no architecture"}[case]
    if case == "bad image":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
        args = [str(ckpt), str(tmp_path / "bad.png")]
    elif case == "missing image":
        args = [str(ckpt), str(tmp_path / "nope.jpg")]
    elif case == "bad checkpoint":
        args = [str(image), str(image)]
    elif case == "short names":
        (tmp_path / "n.txt").write_text("a\nb\n")
        args += ["--class-names", str(tmp_path / "n.txt")]
    else:
        torch.save(build_model("cifar_resnet20", num_classes=10).state_dict(), tmp_path / "raw.pth")
        args = [str(tmp_path / "raw.pth"), str(image)]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and expected in err and err.startswith("classify.py: error:")


def test_raw_state_dict_with_arch(tmp_path: Path, capsys) -> None:
    torch.save(build_model("cifar_resnet20", num_classes=7, in_chans=1).state_dict(), tmp_path / "raw.pth")
    image = _png(tmp_path / "g.png", (28, 28))
    assert main([str(tmp_path / "raw.pth"), str(image), "--arch", "cifar_resnet20", "--dataset", "fashion-mnist",
                 "--topk", "7"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 8  # classes and channels read from the weights


def test_ema_weights(tmp_path: Path, capsys) -> None:
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = build_model("cifar_resnet20", "pedconv", num_classes=10, in_chans=1)
    ema = AveragedModel(model, use_buffers=True)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)
    path = tmp_path / "ck.pth.tar"
    torch.save({"arch": "cifar_resnet20", "conv": "pedconv", "num_classes": 10, "in_chans": 1, "image_size": 28,
                "state_dict": model.state_dict(), "ema": ema.state_dict(), "args": {"dataset": "fashion-mnist"}}, path)
    loaded = load_inference_model(str(path), ema=True)
    torch.testing.assert_close(loaded.model.fc.weight, ema.module.fc.weight)
    assert not any("infomax_decoder" in name for name, _ in loaded.model.named_parameters())
    torch.save({"state_dict": model.state_dict(), "arch": "cifar_resnet20"}, path)
    with pytest.raises(SystemExit):
        main([str(path), str(_png(tmp_path / "i.png", (28, 28))), "--ema"])
    assert "holds no EMA weights" in capsys.readouterr().err


@pytest.mark.parametrize("dataset,size,chans", [("fashion-mnist", 28, 1), ("imagenet", 64, 3)])
def test_16_bit_and_float_images_read_as_their_8_bit_equal(dataset: str, size: int, chans: int, tmp_path: Path,
                                                          capsys) -> None:
    """A 16-bit PNG (PIL mode I;16) and a [0, 1] float TIFF (mode F) of an 8-bit image are preprocessed exactly as
    that image, not clipped to white or black by PIL's own conversion, and without a note."""
    gen = np.random.default_rng(0)
    eight = gen.integers(0, 256, (40, 40)).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 255 -> 65535
    Image.fromarray(eight.astype(np.float32) / 255).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I") and Image.open(tmp_path / "float.tif").mode == "F"
    batch = preprocess_images([str(tmp_path / n) for n in ("eight.png", "sixteen.png", "float.tif")], dataset, size,
                              chans)
    assert torch.equal(batch[1], batch[0]) and torch.equal(batch[2], batch[0])
    assert "note" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_are_refused_naming_the_file(bad: float, tmp_path: Path, capsys) -> None:
    """An all-NaN float TIFF and one inf pixel were read as black and answered confidently (11.77 % 'Ankle boot')."""
    pixels = np.full((28, 28), bad, dtype=np.float32) if bad != bad else np.zeros((28, 28), dtype=np.float32)
    pixels[3, 4] = bad
    Image.fromarray(pixels).save(tmp_path / "bad.tif")
    count = 28 * 28 if bad != bad else 1
    with pytest.raises(DataError, match=rf"cannot read image .*bad.tif: {count} of 784 pixels are NaN or infinite"):
        preprocess_images([str(tmp_path / "bad.tif")], "fashion-mnist", 28, 1)
    ckpt = _checkpoint(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([str(ckpt), str(tmp_path / "bad.tif")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "bad.tif" in err and "NaN or infinite" in err


def test_a_float_image_of_unknown_scale_is_stretched_with_a_note(tmp_path: Path, capsys) -> None:
    pixels = np.linspace(-2, 6, 28 * 28, dtype=np.float32).reshape(28, 28)
    Image.fromarray(pixels).save(tmp_path / "wide.tif")
    Image.fromarray(((pixels + 2) / 8 * 255).round().astype(np.uint8)).save(tmp_path / "eight.png")
    batch = preprocess_images([str(tmp_path / "wide.tif"), str(tmp_path / "eight.png")], "fashion-mnist", 28, 1)
    assert torch.equal(batch[0], batch[1])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: image {tmp_path / 'wide.tif'}: float pixels span [-2, 6], outside the " \
                                   "ranges with a known scale ([0, 1]); stretched from that span to 8 bits" in err
