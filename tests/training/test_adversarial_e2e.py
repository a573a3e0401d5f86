"""main.py with free adversarial training and PGD evaluation (PEDConv Table 4), in-process on tiny JPEGs:
replays as optimizer steps, the perturbation in checkpoints and across resumes, robust top-1 in the raport,
EMA, precise BN and gradient accumulation together."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from image_classification.training import lifecycle
from image_classification.training.checkpoint import load_checkpoint
from image_classification.training.logger import raport_values, read_raport
from image_classification.training.trainer import main

pytestmark = pytest.mark.slow

TINY = ["--arch", "cifar_resnet20", "--image-size", "16", "-j", "0", "--lr", "0.05", "--seed", "3", "-p", "1"]
# 12 training images, mini-batches of 2, optimizer steps of 4 images: 6 mini-batches = 3 groups per epoch
FREE = [*TINY, "-b", "2", "--optimizer-batch-size", "4", "--adv-train", "free", "--adv-replays", "2",
        "--use-ema", "0.9", "--precise-bn", "2", "--lr-schedule", "cosine", "--warmup", "1", "--label-smoothing", "0.1"]


def _run(argv: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _ok(argv: List[str], capsys: pytest.CaptureFixture) -> Tuple[str, str]:
    code, out, err = _run(argv, capsys)
    assert code == 0, err[-3000:]
    return out, err


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def free_run(jpeg_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("free")
    code = main([str(jpeg_folder), *FREE, "--epochs", "2", "--workspace", str(ws)])
    assert code == 0
    return ws


def test_replays_are_optimizer_steps_and_the_perturbation_is_saved(free_run: Path) -> None:
    checkpoint = load_checkpoint(free_run / "checkpoint.pth.tar")
    assert checkpoint["scheduler"]["last_epoch"] == 2 * 3 * 2  # epochs x optimizer steps per epoch x replays
    saved = checkpoint["adversarial"]
    assert (saved["method"], saved["replays"]) == ("free", 2)
    (delta,) = saved["perturbation_per_rank"]
    assert delta.shape == (2, 2, 3, 16, 16)  # (mini-batches per step, batch, C, H, W)
    assert float(delta.abs().max()) == pytest.approx(4 / 255)  # moved, and no further than eps
    records = read_raport(free_run / "raport.json")
    params = records[0]["data"]
    assert (params["adv_train"], params["adv_replays"], params["adv_eps"], params["adv_step_size"]) == (
        "free", 2, 4.0, 4.0)
    logged = [(step, value) for step, value in raport_values(records, "train.lr") if len(step) == 2]
    # logged once per optimizer step (-p 1): at the end of each accumulation group, with its first replay's lr
    assert [step for step, _ in logged] == [[0, 2], [0, 4], [0, 6], [1, 2], [1, 4], [1, 6]]
    # warmup over the 6 optimizer steps of epoch 0 (3 groups x 2 replays), then cosine
    assert [lr for _, lr in logged[:3]] == pytest.approx([0.05 / 6, 0.05 * 3 / 6, 0.05 * 5 / 6])
    assert all(r["data"]["train.top1"] <= 100 for r in records if r["type"] == "LOG" and "train.top1" in r["data"])


def test_resume_restores_the_perturbation_bit_for_bit(jpeg_folder: Path, tmp_path: Path, free_run: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    part = tmp_path / "part"
    _ok([str(jpeg_folder), *FREE, "--epochs", "2", "--run-epochs", "1", "--workspace", str(part)], capsys)
    _ok([str(jpeg_folder), *FREE, "--epochs", "2", "--resume", "auto", "--workspace", str(part)], capsys)
    full, resumed = (load_checkpoint(ws / "checkpoint.pth.tar") for ws in (free_run, part))
    _same(full["state_dict"], resumed["state_dict"])
    _same(full["ema"], resumed["ema"])
    assert torch.equal(full["adversarial"]["perturbation_per_rank"][0],
                       resumed["adversarial"]["perturbation_per_rank"][0])


def test_interrupted_mid_epoch_resumes_identically(jpeg_folder: Path, tmp_path: Path, free_run: Path,
                                                   capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    original = lifecycle.train_one_epoch

    def stop_after_one_step(comp, cfg, loader, epoch, raport, stop_requested, **kwargs):  # noqa: ANN001
        return original(comp, cfg, loader, epoch, raport, lambda: epoch == 1, **kwargs)

    ws = tmp_path / "ws"
    monkeypatch.setattr(lifecycle, "train_one_epoch", stop_after_one_step)
    code, _, err = _run([str(jpeg_folder), *FREE, "--epochs", "2", "--workspace", str(ws)], capsys)
    assert code == 143 and "received at epoch 1 iteration 2" in err  # one optimizer step = 2 mini-batches
    monkeypatch.setattr(lifecycle, "train_one_epoch", original)
    _ok([str(jpeg_folder), *FREE, "--epochs", "2", "--resume", "auto", "--workspace", str(ws)], capsys)
    full, resumed = (load_checkpoint(w / "checkpoint.pth.tar") for w in (free_run, ws))
    _same(full["state_dict"], resumed["state_dict"])
    assert torch.equal(full["adversarial"]["perturbation_per_rank"][0],
                       resumed["adversarial"]["perturbation_per_rank"][0])
    assert resumed["scheduler"]["last_epoch"] == full["scheduler"]["last_epoch"]


def test_a_resume_that_cannot_reuse_the_perturbation_says_so(jpeg_folder: Path, tmp_path: Path, free_run: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    checkpoint = free_run / "checkpoint.pth.tar"
    args = [str(jpeg_folder), *FREE, "--epochs", "3", "--run-epochs", "1", "--resume", str(checkpoint),
            "--optimizer-batch-size", "2", "--prof", "2", "--workspace", str(ws)]
    _, err = _ok(args, capsys)
    assert "does not fit this run's (1, 2, 3, 16, 16)" in err and "continues from a zero perturbation" in err
    code, _, err = _run([*args, "--optimizer", "rmsprop"], capsys)
    assert code == 2 and "main.py: error: --resume: the checkpoint was trained with --optimizer sgd, this run " \
                         "asks for --optimizer rmsprop" in err


def test_evaluation_under_pgd(jpeg_folder: Path, tmp_path: Path, free_run: Path,
                              capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "eval"
    argv = [str(jpeg_folder), *TINY, "-b", "4", "--evaluate", "--pretrained-weights",
            str(free_run / "checkpoint.pth.tar"), "--attack", "pgd", "--attack-eps", "8", "--attack-step-size", "4"]
    out, _ = _ok([*argv, "--use-ema", "0.9", "--attack-steps", "3", "1", "--workspace", str(ws)], capsys)
    records = read_raport(ws / "raport.json")
    summary = records[-1]["data"]
    for prefix in ("val_pgd1", "val_pgd3", "val_ema_pgd1", "val_ema_pgd3"):
        assert summary[f"{prefix}.samples"] == 9 and 0 <= summary[f"{prefix}.top1"] <= 100
        assert 0 < summary[f"{prefix}.linf"] <= 8 + 1e-3  # JPEG pixels are in [0, 1]: the budget holds exactly
    assert summary["val_pgd3.top1"] <= summary["val.top1"]
    meta = {r["metric"] for r in records if r["type"] == "METADATA"}
    assert {"val_pgd3.top1", "val_ema_pgd1.linf"} <= meta
    assert "under attack: PGD-3 (eps 8/255, step 4/255, random start): top1" in out
    assert "under attack: PGD-1 (eps 8/255, step 4/255, random start): EMA top1" in out
    # the same seed gives the same robust accuracy (the random starts are seeded per batch)
    _ok([*argv, "--attack-steps", "3", "--workspace", str(tmp_path / "again")], capsys)
    again = read_raport(tmp_path / "again" / "raport.json")[-1]["data"]
    assert again["val_pgd3.top1"] == summary["val_pgd3.top1"] and again["val_pgd3.loss"] == summary["val_pgd3.loss"]


def _two_ranks(e2e, args: list) -> subprocess.CompletedProcess:  # noqa: ANN001
    """A 2-process gloo job (ranks started as torchrun would, tests/training/conftest.py); rank 0's status, with
    the stderr of both ranks."""
    procs = e2e.launch_ranks([args, args])
    try:
        outputs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return subprocess.CompletedProcess(procs[0].args, procs[0].returncode if procs[1].returncode == 0 else
                                       procs[1].returncode, outputs[0][0], outputs[0][1] + outputs[1][1])


def test_ddp_keeps_one_perturbation_per_rank_across_a_resume(e2e, tmp_path: Path) -> None:  # noqa: ANN001
    ws = tmp_path / "ddp"
    args = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "-b", "2", "-j", "0",
            "--num-classes", "3", "--lr", "0.05", "--seed", "1", "-p", "1", "--prof", "2", "--adv-train", "free",
            "--adv-replays", "2", "--precise-bn", "1", "--epochs", "2", "--workspace", str(ws)]
    first = _two_ranks(e2e, [*args, "--run-epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    saved = load_checkpoint(ws / "checkpoint.pth.tar")["adversarial"]["perturbation_per_rank"]
    assert len(saved) == 2 and not torch.equal(saved[0], saved[1])  # each rank attacked its own images
    assert all(float(delta.abs().max()) == pytest.approx(4 / 255) for delta in saved)
    second = _two_ranks(e2e, [*args, "--resume", "auto"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "zero perturbation" not in second.stderr
    assert load_checkpoint(ws / "checkpoint.pth.tar")["scheduler"]["last_epoch"] == 2 * 2 * 2


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_free_training_and_pgd_under_amp(tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str) -> None:
    """fp16: GradScaler-scaled perturbation gradients and PGD's dynamic input-gradient scale; bf16: plain autocast."""
    common = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "-b", "4", "-j", "0",
              "--num-classes", "3", "--seed", "1", "--prof", "1", "--amp", "--amp-dtype", dtype, "--memory-format",
              "nhwc"]
    ws = tmp_path / "ws"
    _ok([*common, "--epochs", "1", "--adv-train", "free", "--adv-replays", "2", "--workspace", str(ws)], capsys)
    (delta,) = load_checkpoint(ws / "checkpoint.pth.tar")["adversarial"]["perturbation_per_rank"]
    assert torch.isfinite(delta).all() and float(delta.abs().max()) <= 4 / 255 + 1e-7
    out, _ = _ok([*common, "--evaluate", "--pretrained-weights", str(ws / "checkpoint.pth.tar"), "--attack", "pgd",
                  "--attack-steps", "2", "--raport-file", "eval.json", "--workspace", str(ws)], capsys)
    assert "under attack: PGD-2 (eps 4/255, step 1/255, random start): top1" in out
