"""PixelNormalizer against the float64 formula (both kernels, both layouts) and device_batches (CPU; CUDA when
present: the side-stream copies give the same batches as plain copies)."""

from __future__ import annotations

import pytest
import torch

from image_classification.data.prefetch import PixelNormalizer, device_batches

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, -1, 1, 1)
    return (images.double() / 255 - mean) / std


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_normalizer_matches_the_formula(fused: bool, memory_format: torch.memory_format) -> None:
    images = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for source in (images, images.contiguous(memory_format=torch.channels_last)):
        out = PixelNormalizer(MEAN, STD, memory_format=memory_format, fused=fused)(source)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out.double(), reference(images), rtol=0, atol=2e-6)


def test_normalizer_refuses_what_it_cannot_convert() -> None:
    with pytest.raises(TypeError, match="takes uint8 images, got torch.float32"):
        PixelNormalizer(MEAN, STD)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="images have 1 channels, the normalisation 3"):
        PixelNormalizer(MEAN, STD)(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mean has 3 channels, std 1"):
        PixelNormalizer(MEAN, (0.5,))


def _batches(n: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=g), torch.tensor([i, i + 1]))
            for i in range(n)]


def test_device_batches_on_the_cpu() -> None:
    batches = _batches(3)
    out = list(device_batches(batches, torch.device("cpu"), PixelNormalizer(MEAN, STD)))
    assert len(out) == 3
    for (images, targets), (raw, labels) in zip(out, batches):
        torch.testing.assert_close(images.double(), reference(raw), rtol=0, atol=2e-6)
        assert torch.equal(targets, labels)
    assert list(device_batches([], torch.device("cpu"), PixelNormalizer(MEAN, STD))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_batches_on_cuda_overlap_and_equal_plain_copies() -> None:
    device = torch.device("cuda")
    batches = [(images.pin_memory(), targets.pin_memory()) for images, targets in _batches(4)]
    normalize = PixelNormalizer(MEAN, STD, device, torch.channels_last)
    assert normalize.fused
    for (images, targets), (raw, labels) in zip(device_batches(batches, device, normalize), batches):
        assert images.device.type == "cuda" and images.is_contiguous(memory_format=torch.channels_last)
        torch.cuda.current_stream().synchronize()
        torch.testing.assert_close(images.double().cpu(), reference(raw), rtol=0, atol=2e-6)
        assert torch.equal(targets.cpu(), labels)
