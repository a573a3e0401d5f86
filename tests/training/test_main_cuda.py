"""main.py on a CUDA GPU end to end: AMP (fp16 with GradScaler, bf16), channels_last, torch.compile, EMA,
resume, the Triton PEDConv path, NCCL DDP through multiproc.py and the dali-gpu backend.

Marked ``cuda`` (skipped without a GPU; ``bash scripts/gpu_checks.sh`` runs them) and ``slow``. Every run
uses the tiny JPEG ImageFolder of tests/training/conftest.py and a few iterations.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest
import torch

from image_classification.training.checkpoint import load_checkpoint
from image_classification.training.logger import raport_values, read_raport

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def _ok(result) -> None:
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _gpu(e2e: SimpleNamespace, extra: List[str]) -> List[str]:
    return [*e2e.tiny, "--device", "cuda", "-j", "2", *extra]


def _val_top1(ws: Path) -> List[float]:
    return [v for step, v in raport_values(read_raport(ws / "raport.json"), "val.top1") if step]


@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_amp_nhwc_train_evaluate(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path, amp_dtype: str) -> None:
    """fp16 keeps a GradScaler state in the checkpoint, bf16 none; the checkpoint evaluates to the logged top-1."""
    ws = tmp_path / "train"
    _ok(e2e.run([str(jpeg_folder), *_gpu(e2e, ["--conv", "pedconv", "--amp", "--amp-dtype", amp_dtype,
                                               "--memory-format", "nhwc", "--epochs", "2", "--workspace", str(ws)])],
                timeout=300))
    checkpoint = load_checkpoint(ws / "checkpoint.pth.tar")
    assert checkpoint["epoch"] == 2
    assert (checkpoint["scaler"] is not None) == (amp_dtype == "fp16")
    logged = _val_top1(ws)
    assert len(logged) == 2
    _ok(e2e.run([str(jpeg_folder), *_gpu(e2e, ["--conv", "pedconv", "--amp", "--amp-dtype", amp_dtype,
                                               "--memory-format", "nhwc", "--evaluate", "--pretrained-weights",
                                               str(ws / "checkpoint.pth.tar"), "--workspace", str(tmp_path / "eval")])],
                timeout=300))
    assert _val_top1(tmp_path / "eval")[-1] == pytest.approx(logged[-1], abs=1e-6)


def test_triton_path_fp16_nhwc_ema_and_resume(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    """PEDConv on the fused Triton path (GradScaler, channels_last) with EMA; a resumed run continues."""
    recipe = [str(jpeg_folder), *_gpu(e2e, ["--conv", "pedconv:path=triton", "--amp", "--memory-format", "nhwc",
                                            "--use-ema", "0.9", "--epochs", "2"])]
    ws = tmp_path / "part"
    _ok(e2e.run([*recipe, "--run-epochs", "1", "--workspace", str(ws)], timeout=300))
    assert load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] == 1
    _ok(e2e.run([*recipe, "--resume", "auto", "--workspace", str(ws)], timeout=300))
    checkpoint = load_checkpoint(ws / "checkpoint.pth.tar")
    assert checkpoint["epoch"] == 2 and checkpoint["ema"] is not None and checkpoint["scaler"] is not None
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())
    records = read_raport(ws / "raport.json")
    assert [v for step, v in raport_values(records, "val_ema.top1") if step]


def test_autotuned_paths_offer_triton(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    result = e2e.run([str(jpeg_folder), *_gpu(e2e, ["--conv", "pedconv", "--amp", "--memory-format", "nhwc",
                                                    "--epochs", "1", "--print-paths", "--workspace", str(tmp_path)])],
                     env={"PEDCONV_AUTOTUNE": "1"}, timeout=300)
    _ok(result)
    assert "triton" in result.stdout + result.stderr  # timed next to the other paths


def test_compile_amp_train_and_evaluate(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    _ok(e2e.run([str(jpeg_folder), *_gpu(e2e, ["--conv", "pedconv", "--amp", "--compile", "--memory-format", "nhwc",
                                               "--epochs", "1", "--workspace", str(tmp_path / "c")])], timeout=600))
    state = load_checkpoint(tmp_path / "c" / "checkpoint.pth.tar")["state_dict"]
    assert not any(key.startswith("_orig_mod") for key in state)
    _ok(e2e.run([str(jpeg_folder), *_gpu(e2e, ["--conv", "pedconv", "--evaluate", "--pretrained-weights",
                                               str(tmp_path / "c" / "checkpoint.pth.tar"),
                                               "--workspace", str(tmp_path / "e")])], timeout=300))


def test_nccl_ddp_world_size_1(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    result = e2e.run([str(jpeg_folder), *_gpu(e2e, ["--conv", "pedconv", "--amp", "--epochs", "1",
                                                    "--workspace", str(tmp_path)])],
                     launcher=[str(e2e.repo / "multiproc.py"), "--nproc_per_node", "1"], timeout=300)
    _ok(result)
    records = read_raport(tmp_path / "raport.json")
    assert records[0]["data"]["world_size"] == 1


def test_nccl_ddp_two_processes_on_one_gpu(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    """Two ranks sharing the GPU: NCCL refuses duplicate GPUs in one communicator on most versions (skip)."""
    args = list(_gpu(e2e, ["--conv", "pedconv", "--epochs", "1", "--optimizer-batch-size", "8",
                           "--workspace", str(tmp_path)]))
    args[args.index("-b") + 1] = "2"
    result = e2e.run([str(jpeg_folder), *args], launcher=[str(e2e.repo / "multiproc.py"), "--nproc_per_node", "2"],
                     timeout=300)
    if result.returncode != 0 and torch.cuda.device_count() < 2:
        text = (result.stdout + result.stderr).lower()
        if "duplicate gpu" in text or "invalid usage" in text or "nccl" in text:
            pytest.skip("NCCL does not allow two ranks on one GPU here: " + text.strip().splitlines()[-1][:200])
    _ok(result)
    assert read_raport(tmp_path / "raport.json")[0]["data"]["world_size"] == 2


def test_dali_gpu_backend(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        pytest.skip("nvidia-dali is not installed")
    args = list(_gpu(e2e, ["--data-backend", "dali-gpu", "--amp", "--memory-format", "nhwc", "--epochs", "1",
                           "--workspace", str(tmp_path)]))
    args[args.index("--image-size") + 1] = "32"  # DALI's crops want a few more pixels than 16
    _ok(e2e.run([str(jpeg_folder), *args], timeout=300))
    assert _val_top1(tmp_path)
