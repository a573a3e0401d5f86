"""End-to-end runs of main.py / multiproc.py on tiny generated data (CPU, a few seconds each)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch

from image_classification.training.checkpoint import load_checkpoint
from image_classification.training.logger import raport_values, read_raport

pytestmark = pytest.mark.slow

TRAIN_METRICS = ("train.loss", "train.infomax", "train.lr", "train.compute_ips", "train.total_ips", "train.data_time")
VAL_METRICS = ("val.top1", "val.top5", "val.loss", "val.compute_ips", "val.compute_latency")
CHECKPOINT_KEYS = ("epoch", "arch", "conv", "placement", "num_classes", "in_chans", "image_size", "state_dict",
                   "optimizer", "scheduler", "scaler", "ema", "best_prec1", "rng", "args")


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, f"rc {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("main.py: error: "), result.stderr
    return lines[-1]


def _in_process_error(argv: List[str], capsys: pytest.CaptureFixture) -> str:
    from image_classification.training.trainer import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("main.py: error: "), err
    return lines[-1]


def _epoch_records(records: List[Dict]) -> List[Dict]:
    return [r for r in records if r["type"] == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 1]


@pytest.fixture(scope="module")
def trained(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs, pytorch backend, cosine schedule with warmup: the workspace."""
    ws = tmp_path_factory.mktemp("trained")
    _ok(e2e.run([str(jpeg_folder), *e2e.tiny, "--epochs", "2", "--warmup", "1", "--lr-schedule", "cosine",
                  "--workspace", str(ws)]))
    return ws


def test_two_epochs_raport_and_checkpoints(e2e: SimpleNamespace, trained: Path) -> None:
    records = read_raport(trained / "raport.json")
    assert records[0]["step"] == "PARAMETER" and records[0]["data"]["arch"] == "cifar_resnet20"
    meta = {r["metric"] for r in records if r["type"] == "METADATA"}
    assert set(TRAIN_METRICS + VAL_METRICS) <= meta
    iteration = [r for r in records if r["type"] == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 2]
    assert [r["step"] for r in iteration] == [[0, 1], [0, 2], [0, 3], [1, 1], [1, 2], [1, 3]]
    assert all(set(TRAIN_METRICS) <= set(r["data"]) for r in iteration)
    epochs = _epoch_records(records)
    assert [r["step"] for r in epochs] == [[0], [1]]
    assert all(set(VAL_METRICS) <= set(r["data"]) and r["data"]["val.samples"] == 9 for r in epochs)
    assert records[-1]["step"] == [] and records[-1]["data"]["summary.epochs"] == 2
    lrs = [v for _, v in raport_values(records, "train.lr")]
    assert lrs == pytest.approx([0.05 / 3, 0.1 / 3, 0.05, 0.05, 0.0375, 0.0125])  # per-iteration warmup, cosine
    checkpoint = load_checkpoint(trained / "checkpoint.pth.tar")
    assert set(CHECKPOINT_KEYS) <= set(checkpoint)
    assert checkpoint["epoch"] == 2 and checkpoint["conv"] == "static" and checkpoint["num_classes"] == 3
    assert not any(k.startswith("module.") for k in checkpoint["state_dict"])
    assert (trained / "model_best.pth.tar").is_file()


def test_evaluate_reproduces_logged_top1(e2e: SimpleNamespace, trained: Path, jpeg_folder: Path,
                                         tmp_path: Path) -> None:
    epochs = _epoch_records(read_raport(trained / "raport.json"))
    tops = [r["data"]["val.top1"] for r in epochs]
    best = epochs[tops.index(max(tops))]["data"]
    # the authors' README evaluation command, on this data and model
    result = e2e.run([str(jpeg_folder), "--data-backend", "pytorch", "--arch", "cifar_resnet20", "--evaluate",
                       "--epochs", "1", "--pretrained-weights", str(trained / "model_best.pth.tar"), "-b", "100",
                       "--image-size", "16", "-j", "0", "--workspace", str(tmp_path)])
    _ok(result)
    final = read_raport(tmp_path / "raport.json")[-1]["data"]
    assert final["val.top1"] == best["val.top1"]
    assert final["val.loss"] == pytest.approx(best["val.loss"], rel=1e-5)
    assert not (tmp_path / "checkpoint.pth.tar").exists()


def test_evaluate_takes_arch_and_operator_from_the_checkpoint(trained: Path, jpeg_folder: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """No --arch/--conv: the checkpoint's (the parser's fallback resnet50 would not fit it)."""
    from image_classification.training.trainer import main

    epochs = _epoch_records(read_raport(trained / "raport.json"))
    best = max(r["data"]["val.top1"] for r in epochs)
    code = main([str(jpeg_folder), "--evaluate", "--pretrained-weights", str(trained / "model_best.pth.tar"),
                 "--image-size", "16", "-j", "0", "--workspace", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    final = read_raport(tmp_path / "raport.json")[-1]["data"]
    assert final["val.top1"] == best
    params = next(r["data"] for r in read_raport(tmp_path / "raport.json") if r.get("step") == "PARAMETER")
    assert params["arch"] == "cifar_resnet20" and params["placement"] == "paper" and params["conv"] == "static"


def test_an_unseeded_subset_names_its_seed_and_that_seed_draws_it_again(trained: Path, jpeg_folder: Path,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """--val-subset without --seed: a note names the seed drawn; --seed with it evaluates the same images (the
    same loss), and says nothing more."""
    import re

    from image_classification.training.trainer import main

    common = [str(jpeg_folder), "--evaluate", "--pretrained-weights", str(trained / "model_best.pth.tar"),
              "--image-size", "16", "-j", "0", "--val-subset", "4"]
    capsys.readouterr()
    assert main([*common, "--workspace", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    note = re.search(r"main.py: note: no --seed, .* pass --seed (\d+) to use the same images again", err)
    assert note is not None
    assert main([*common, "--seed", note.group(1), "--workspace", str(tmp_path / "b")]) == 0
    assert "no --seed" not in capsys.readouterr().err
    first, second = (read_raport(tmp_path / name / "raport.json")[-1]["data"] for name in ("a", "b"))
    assert first["val.samples"] == second["val.samples"] == 4 and first["val.loss"] == second["val.loss"]


def test_a_conflicting_arch_is_refused_before_the_model_is_built(trained: Path, jpeg_folder: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from image_classification.training import build

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint's arch was checked")

    monkeypatch.setattr(build, "build_network", never)
    monkeypatch.setattr(build, "build_data", never)
    line = _in_process_error([str(jpeg_folder), "--arch", "resnet18", "--evaluate", "--pretrained-weights",
                              str(trained / "model_best.pth.tar"), "--workspace", str(tmp_path / "ws")], capsys)
    assert "is for arch cifar_resnet20" in line and "model is arch resnet18" in line


@pytest.mark.skipif(importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
                    reason="nvidia-dali not installed")
def test_two_epochs_dali_cpu(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    args = list(e2e.tiny)
    args[args.index("-j") + 1] = "1"
    _ok(e2e.run([str(jpeg_folder), "--data-backend", "dali-cpu", *args, "--epochs", "2", "--workspace", str(tmp_path)],
                 env={"CUDA_VISIBLE_DEVICES": ""}))
    epochs = _epoch_records(read_raport(tmp_path / "raport.json"))
    assert [r["step"] for r in epochs] == [[0], [1]] and epochs[-1]["data"]["val.samples"] == 9
    assert (tmp_path / "checkpoint.pth.tar").is_file() and (tmp_path / "model_best.pth.tar").is_file()


def _assert_same_state(a: Dict, b: Dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_is_bit_identical(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    recipe = [str(jpeg_folder), *e2e.tiny, "-j", "1", "--epochs", "2", "--conv", "pedconv", "--mixup", "0.2",
              "--label-smoothing", "0.1", "--use-ema", "0.9", "--optimizer-batch-size", "8", "--warmup", "1",
              "--lr-schedule", "cosine", "--nesterov", "--mom", "0.875", "--precise-bn", "2"]
    _ok(e2e.run([*recipe, "--workspace", str(tmp_path / "full")]))
    _ok(e2e.run([*recipe, "--run-epochs", "1", "--workspace", str(tmp_path / "part")]))
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pth.tar")["epoch"] == 1
    _ok(e2e.run([*recipe, "--resume", "auto", "--workspace", str(tmp_path / "part")]))
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pth.tar")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pth.tar")
    assert full["epoch"] == part["epoch"] == 2
    _assert_same_state(full["state_dict"], part["state_dict"])
    _assert_same_state(full["ema"], part["ema"])
    momentum = [s["momentum_buffer"] for s in full["optimizer"]["state"].values()]
    assert all(torch.equal(m, n) for m, n in zip(momentum, [s["momentum_buffer"] for s in
                                                             part["optimizer"]["state"].values()]))
    full_records = read_raport(tmp_path / "full" / "raport.json")
    part_records = read_raport(tmp_path / "part" / "raport.json")  # appended by the resumed run
    for metric in ("val.top1", "val.loss", "val_ema.top1", "train.loss", "train.infomax"):
        stepped = [[v for v in raport_values(records, metric) if v[0]] for records in (full_records, part_records)]
        assert stepped[0] == stepped[1] and stepped[0], metric  # summaries ([] steps) differ by design


def test_ddp_two_processes_agree(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    args = list(e2e.tiny)
    args[args.index("-b") + 1] = "2"
    result = e2e.run([str(jpeg_folder), *args, "--epochs", "2", "--optimizer-batch-size", "8", "--precise-bn", "1",
                       "--workspace", str(tmp_path / "ddp")],
                      launcher=[str(e2e.repo / "multiproc.py"), "--nproc_per_node", "2"], timeout=240)
    _ok(result)
    # no GPU here: multiproc.py says the ranks train on the CPU before they start
    assert "multiproc.py: note: no CUDA device here: the 2 process(es) on this node train on the CPU" in result.stderr
    finished = re.findall(r"\[rank (\d)\] finished: 2/2 epochs, best top1 ([\d.]+)", result.stdout)
    assert sorted(rank for rank, _ in finished) == ["0", "1"] and finished[0][1] == finished[1][1]
    records = read_raport(tmp_path / "ddp" / "raport.json")
    assert records[0]["data"]["world_size"] == 2
    last = _epoch_records(records)[-1]["data"]
    assert last["val.samples"] == 9  # exact: 5 + 4 images on the two ranks, no padding
    _ok(e2e.run([str(jpeg_folder), *e2e.tiny, "--evaluate", "--pretrained-weights",
                  str(tmp_path / "ddp" / "checkpoint.pth.tar"), "--workspace", str(tmp_path / "eval")]))
    single = read_raport(tmp_path / "eval" / "raport.json")[-1]["data"]
    assert single["val.top1"] == last["val.top1"]
    assert single["val.loss"] == pytest.approx(last["val.loss"], rel=1e-5)


def test_sigterm_saves_a_checkpoint_and_resume_continues(e2e: SimpleNamespace, jpeg_folder: Path,
                                                         tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    command = [sys.executable, e2e.main, str(jpeg_folder), *e2e.tiny, "--epochs", "500", "--workspace", str(ws)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(command, cwd=e2e.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        raport = ws / "raport.json"
        while time.time() < deadline and not (raport.exists() and "train.loss" in raport.read_text()):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    checkpoint = load_checkpoint(ws / "checkpoint.pth.tar")
    done = checkpoint["epoch"] * 3 + checkpoint["step_in_epoch"]
    logged = [step for step, _ in raport_values(read_raport(raport), "train.loss") if len(step) == 2]
    assert done == logged[-1][0] * 3 + logged[-1][1]  # the checkpoint holds every logged iteration
    result = e2e.run([str(jpeg_folder), *e2e.tiny, "--epochs", "500", "--run-epochs", "1", "--resume",
                       str(ws / "checkpoint.pth.tar"), "--workspace", str(ws)])
    _ok(result)
    assert load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] == checkpoint["epoch"] + 1


def test_authors_readme_commands(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    """The authors' README training command (continuations fixed) via multiproc.py, then their evaluation
    command without --dynamic: the operator comes from the checkpoint."""
    train = (f"./multiproc.py --nproc_per_node 1 ./main.py {jpeg_folder} --data-backend pytorch "
             "--raport-file raport.json -j8 -p 100 --lr 0.512 --optimizer-batch-size 8 --warmup 8 --arch resnet18 "
             "--dynamic -c fanin --label-smoothing 0.1 --lr-schedule cosine --mom 0.875 --wd 3.0517578125e-05 "
             "-b 4 --epochs 250 --mixup 0.2")
    smoke = ["--image-size", "32", "--prof", "2", "--run-epochs", "1", "--workspace", str(tmp_path / "logs")]
    argv = shlex.split(train)
    result = e2e.run(argv[4:] + smoke, launcher=argv[:3], timeout=240)  # e2e.run adds main.py
    _ok(result)
    assert (tmp_path / "logs" / "model_best.pth.tar").is_file()
    evaluate = (f"./main.py {jpeg_folder} --data-backend pytorch --arch resnet18 --evaluate --epochs 1 "
                f"--pretrained-weights {tmp_path / 'logs' / 'model_best.pth.tar'} -b 100")
    result = e2e.run(shlex.split(evaluate)[1:] + ["--image-size", "32", "--workspace", str(tmp_path / "eval")])
    _ok(result)
    records = read_raport(tmp_path / "eval" / "raport.json")
    assert records[0]["data"]["conv"] == "pedconv" and records[-1]["data"]["val.samples"] == 9


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize(
    "case",
    ["missing-data", "no-val-folder", "truncated-checkpoint", "other-arch", "other-operator", "opt-batch",
     "missing-checkpoint", "directory-as-checkpoint", "file-as-data"],
)
def test_bad_input_one_line_exit_2_nothing_written(e2e: SimpleNamespace, case: str, trained: Path, jpeg_folder: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    best = trained / "model_best.pth.tar"
    data = str(jpeg_folder)
    extra: List[str] = []
    needle = ""
    if case == "missing-data":
        data, needle = str(tmp_path / "nowhere"), "nowhere"
    elif case == "no-val-folder":
        partial = tmp_path / "partial"
        (partial / "train" / "a").mkdir(parents=True)
        (partial / "train" / "a" / "x.jpg").write_bytes((jpeg_folder / "train" / "a" / "a0.jpg").read_bytes())
        data, needle = str(partial), "val"
    elif case == "truncated-checkpoint":
        extra, needle = ["--evaluate", "--pretrained-weights", str(_truncated(best, tmp_path / "cut.pth.tar"))], "cut"
    elif case == "other-arch":
        extra, needle = ["--arch", "resnet18_small", "--evaluate", "--pretrained-weights", str(best)], "arch"
    elif case == "other-operator":
        extra, needle = ["--conv", "pedconv", "--resume", str(trained / "checkpoint.pth.tar")], "operator"
    elif case == "opt-batch":
        extra, needle = ["--optimizer-batch-size", "6"], "--optimizer-batch-size 6"
    elif case == "missing-checkpoint":
        extra, needle = ["--resume", str(tmp_path / "gone.pth.tar")], "gone.pth.tar"
    elif case == "directory-as-checkpoint":
        extra = ["--evaluate", "--pretrained-weights", str(trained)]
        needle = f"--pretrained-weights {trained} is a directory, not a checkpoint file (e.g. {trained}/checkpoint"
    elif case == "file-as-data":
        data, needle = str(best), f"DATA {best} is a file; give the directory holding train/ and val/"
    before = e2e.snapshot(trained)
    ws = tmp_path / "ws"
    argv = [data, *e2e.tiny, "--epochs", "1", *extra, "--workspace", str(ws)]
    if case == "truncated-checkpoint":  # one case through a real process: exit status and no traceback
        line = _one_line_error(e2e.run(argv))
    else:  # the others in-process (main() is what main.py runs), saving a torch import per case
        line = _in_process_error(argv, capsys)
    assert needle in line
    assert not ws.exists()
    assert e2e.snapshot(trained) == before


def test_corrupt_image_names_the_file(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    """Decode errors surface while iterating; still one line, status 2 (the raport of the run stays)."""
    data = tmp_path / "data"
    for source in jpeg_folder.rglob("*.jpg"):
        target = data / source.relative_to(jpeg_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (data / "train" / "b" / "b1.jpg").write_bytes(b"not a jpeg")
    line = _one_line_error(e2e.run([str(data), *e2e.tiny, "--epochs", "1", "--workspace", str(tmp_path / "ws")]))
    assert "b1.jpg" in line


def test_recipe_with_amp_nhwc_gather_training_only(e2e: SimpleNamespace, jpeg_folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("amp: true\namp_dtype: bf16\nmemory-format: nhwc\ngather-checkpoints: 1\ntraining-only: true\n"
                      "epochs: 2\nlr-schedule: step\nlr-steps: [1]\n")
    ws = tmp_path / "ws"
    _ok(e2e.run([str(jpeg_folder), *e2e.tiny, "--config", str(config), "--workspace", str(ws)]))
    assert sorted(p.name for p in ws.iterdir()) == ["checkpoint-0002.pth.tar", "checkpoint.pth.tar", "raport.json"]
    records = read_raport(ws / "raport.json")
    params = records[0]["data"]
    assert params["amp"] and params["amp_dtype"] == "bf16" and params["memory_format"] == "nhwc"
    assert not raport_values(records, "val.top1")
    lrs = [v for _, v in raport_values(records, "train.lr")]
    assert lrs == pytest.approx([0.05] * 3 + [0.005] * 3)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST package not installed")
def test_fashion_mnist_default_path_one_channel(e2e: SimpleNamespace, tmp_path: Path) -> None:
    args = list(e2e.tiny)
    args[args.index("--image-size") + 1] = "28"
    _ok(e2e.run(["--dataset", "fashion-mnist", *args, "--epochs", "1", "--prof", "2", "--workspace", str(tmp_path)]))
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert (checkpoint["in_chans"], checkpoint["num_classes"], checkpoint["image_size"]) == (1, 10, 28)
    # --evaluate (and --resume) without --dataset take the checkpoint's: Fashion-MNIST from its default path
    _ok(e2e.run([*args, "--evaluate", "--val-subset", "16", "--pretrained-weights",
                 str(tmp_path / "checkpoint.pth.tar"), "--workspace", str(tmp_path / "eval")]))
    records = read_raport(tmp_path / "eval" / "raport.json")
    assert records[0]["data"]["dataset"] == "fashion-mnist" and records[-1]["data"]["val.samples"] == 16


def test_path_tuning_is_announced_bounded_and_remembered(e2e: SimpleNamespace, tmp_path: Path) -> None:
    """The first run tunes (a line before, a summary after) and writes the caches; --evaluate and a second run
    on the same machine find every choice there and time nothing."""
    env = {"PEDCONV_AUTOTUNE": "1", "PEDCONV_CACHE_DIR": str(tmp_path / "cache")}
    tiny = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--conv", "pedconv", "--num-classes", "4",
            "--image-size", "12", "-b", "4", "--epochs", "1", "--prof", "2", "-j", "0", "--seed", "1"]
    first = e2e.run([*tiny, "--workspace", str(tmp_path / "a")], env=env)
    _ok(first)
    assert "tuning PEDConv paths: 18 layers x 2 pass(es), budget 10 s" in first.stderr
    assert "ready in" in first.stderr and ": 0 new layer" not in first.stderr
    assert (tmp_path / "a" / "pedconv_paths.json").is_file()
    assert len(list((tmp_path / "cache").glob("paths-*.json"))) == 1
    for argv in ([*tiny, "--workspace", str(tmp_path / "b")],
                 [*tiny, "--evaluate", "--pretrained-weights", str(tmp_path / "a" / "checkpoint.pth.tar"),
                  "--workspace", str(tmp_path / "c")]):
        again = e2e.run(argv, env=env)
        _ok(again)
        assert ": 0 new layer shape(s) timed in 0.0 s" in again.stderr and "known from the path cache" in again.stderr
    spent = e2e.run([*tiny, "--autotune-budget", "0", "--workspace", str(tmp_path / "d")],
                    env={**env, "PEDCONV_CACHE_DIR": str(tmp_path / "empty")})
    _ok(spent)
    assert "left to the heuristic (--autotune-budget 0 s spent" in spent.stderr


@pytest.mark.parametrize("case", ["other-batch", "past-the-epoch"])
def test_a_mid_epoch_checkpoint_resumes_only_where_it_stopped(case: str, e2e: SimpleNamespace, trained: Path,
                                                              jpeg_folder: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A checkpoint written at iteration 1 of epoch 1 (of 3, at -b 4): another batch size would continue at
    another image and an iteration past the epoch's end would skip it; both are refused with the reason."""
    import torch

    checkpoint = load_checkpoint(trained / "checkpoint.pth.tar")
    checkpoint.update(epoch=1, step_in_epoch=1 if case == "other-batch" else 10**6, pending_validation=False)
    mid = tmp_path / "mid.pth.tar"
    torch.save(checkpoint, mid)
    tiny = list(e2e.tiny)
    tiny[tiny.index("-b") + 1] = "2" if case == "other-batch" else "4"
    argv = [str(jpeg_folder), *tiny, "--epochs", "2", "--resume", str(mid),
            "--workspace", str(tmp_path / "ws")]
    line = _in_process_error(argv, capsys)
    if case == "other-batch":
        assert "stopped epoch 1 after 1 iterations of -b 4 on 1 process(es) (4 images)" in line
        assert "resume with -b 4 on 1 process(es)" in line
    else:
        assert "'step_in_epoch' is 1000000, but epoch 1 has only 3 iteration(s)" in line



def test_evaluate_refuses_a_non_finite_loss_with_status_3(e2e: SimpleNamespace, trained: Path, jpeg_folder: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Finite weights whose eval-mode outputs are not (a negative running variance): no top-1, exit 3, the
    raport still shows the NaN."""
    import torch

    from image_classification.training.trainer import main

    checkpoint = load_checkpoint(trained / "model_best.pth.tar")
    key = next(k for k in checkpoint["state_dict"] if k.endswith("running_var"))
    checkpoint["state_dict"][key] = -torch.ones_like(checkpoint["state_dict"][key])
    bad = tmp_path / "bad.pth.tar"
    torch.save(checkpoint, bad)
    capsys.readouterr()
    code = main([str(jpeg_folder), "--evaluate", "--pretrained-weights", str(bad), "--image-size", "16", "-j", "0",
                 "--workspace", str(tmp_path / "ws")])
    out, err = capsys.readouterr()
    assert code == 3 and "evaluation: top1" not in out
    assert "main.py: error: validation loss of the model is nan: the checkpoint's eval-mode outputs" in err
    final = read_raport(tmp_path / "ws" / "raport.json")[-1]["data"]
    assert final["val.loss"] != final["val.loss"]  # NaN recorded


def test_a_worker_killed_mid_step_is_one_line(jpeg_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's SIGCHLD handler raises a killed worker's error wherever the main process is (in a forward, not
    only where the next batch is read): the same one line as the loader's, exit status 2."""
    from image_classification.training import lifecycle

    def killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    monkeypatch.setattr(lifecycle, "train_one_epoch", killed)
    line = _in_process_error([str(jpeg_folder), "--arch", "cifar_resnet20", "--image-size", "16", "-b", "4",
                              "-j", "2", "--epochs", "1", "--workspace", str(tmp_path / "ws")], capsys)
    assert line == ("main.py: error: DataLoader worker (pid(s) 4242) exited unexpectedly: out of memory? lower "
                    "-j/--workers (now 2) or the batch size, or give the job more memory (/dev/shm included)")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_involution_trains_then_evaluates_finite(tmp_path: Path, capsys: pytest.CaptureFixture, seed: int) -> None:
    """The issue's command: two SGD steps of Involution on CIFAR ResNet-20, then eval mode. With two
    involutions per basic block (placement paper) the eval activations reached 1e31 and the loss NaN at any
    lr; the operator's own placement (paper+last: one per block, as RedNet) stays finite."""
    import math

    from image_classification.training.trainer import main

    code = main(["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--num-classes", "10", "--image-size",
                 "32", "-b", "4", "--epochs", "1", "--prof", "2", "-j", "0", "--conv", "involution", "--seed",
                 str(seed), "--workspace", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    records = read_raport(tmp_path / "raport.json")
    params = next(r["data"] for r in records if r.get("step") == "PARAMETER")
    assert params["placement"] == "paper+last"
    assert math.isfinite(records[-1]["data"]["val.loss"])


def test_evaluate_resume_auto_without_a_checkpoint_is_refused(e2e: SimpleNamespace, tmp_path: Path) -> None:
    """--evaluate --resume auto on a workspace without a checkpoint would evaluate random weights: refused."""
    res = e2e.run(["--data-backend", "synthetic", *e2e.tiny, "--num-classes", "3", "--prof", "2",
                   "--workspace", str(tmp_path / "empty"), "--evaluate", "--resume", "auto"])
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "--evaluate --resume auto:" in line and "no weights to evaluate" in line
    assert not (tmp_path / "empty" / "raport.json").exists()


@pytest.mark.parametrize("flag,value,shown", [("--seed", "4", "--seed 3 -> 4"),
                                              ("--train-subset", "6", "--train-subset None -> 6"),
                                              ("--image-size", "20", "--image-size 16 -> 20")])
def test_a_mid_epoch_resume_refuses_another_data_order_or_input(flag: str, value: str, shown: str,
                                                                e2e: SimpleNamespace, trained: Path,
                                                                jpeg_folder: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """The rest of an interrupted epoch must read the images the interrupted run would have read: another seed
    (the shuffle), training subset or image size mid-epoch is refused, naming the change."""
    import torch

    checkpoint = load_checkpoint(trained / "checkpoint.pth.tar")
    checkpoint.update(epoch=1, step_in_epoch=1, pending_validation=False)
    mid = tmp_path / "mid.pth.tar"
    torch.save(checkpoint, mid)
    tiny = list(e2e.tiny)
    if flag in tiny:
        tiny[tiny.index(flag) + 1] = value
    else:
        tiny += [flag, value]
    line = _in_process_error([str(jpeg_folder), *tiny, "--epochs", "2", "--resume", str(mid),
                              "--workspace", str(tmp_path / "ws")], capsys)
    assert "the checkpoint stopped part-way through epoch 1 (iteration 1)" in line and shown in line, line


@pytest.mark.parametrize("conv", ["dyconv", "condconv", "odconv"])
def test_nhwc_trains_the_operators_with_kernel_banks(conv: str, e2e: SimpleNamespace, tmp_path: Path) -> None:
    """--memory-format nhwc laid out the model with model.to(memory_format=...), which refuses the 5-D kernel banks
    of DY-Conv, CondConv and ODConv (a crash before the first step)."""
    res = e2e.run(["--data-backend", "synthetic", *e2e.tiny, "--num-classes", "3", "--prof", "2", "--epochs", "1",
                   "--conv", conv, "--memory-format", "nhwc", "--no-autotune", "--workspace", str(tmp_path / "ws")])
    _ok(res)
    assert "finished: 1/1 epochs" in res.stdout


def test_no_raport_is_replaced_without_overwrite(e2e: SimpleNamespace, tmp_path: Path) -> None:
    """A finished run without checkpoints, then --resume auto in the same workspace (which starts again: there is no
    checkpoint), then two evaluations in another workspace: every earlier record stays; --overwrite replaces."""
    ws, common = tmp_path / "ws", ["--data-backend", "synthetic", *e2e.tiny, "--num-classes", "3", "--prof", "2",
                                   "--epochs", "1", "--no-autotune"]
    _ok(e2e.run([*common, "--no-checkpoints", "--workspace", str(ws)]))
    first = read_raport(ws / "raport.json")
    _ok(e2e.run([*common, "--resume", "auto", "--lr", "0.03", "--workspace", str(ws)]))
    both = read_raport(ws / "raport.json")
    assert both[:len(first)] == first and len(both) > len(first)
    assert [r["data"]["lr"] for r in both if r.get("step") == "PARAMETER"] == [0.05, 0.03]
    evaluated = tmp_path / "eval"
    for _ in range(2):
        _ok(e2e.run([*common, "--evaluate", "--pretrained-weights", str(ws / "checkpoint.pth.tar"),
                     "--workspace", str(evaluated)]))
    assert sum(r.get("step") == "PARAMETER" for r in read_raport(evaluated / "raport.json")) == 2
    _ok(e2e.run([*common, "--evaluate", "--overwrite", "--pretrained-weights", str(ws / "checkpoint.pth.tar"),
                 "--workspace", str(evaluated)]))
    assert sum(r.get("step") == "PARAMETER" for r in read_raport(evaluated / "raport.json")) == 1


def test_an_epoch_resumed_mid_way_is_summarised_whole(e2e: SimpleNamespace, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A run stopped after the first iteration of epoch 1 and resumed from its checkpoint logs the same epoch-1
    summary (loss, info-max, top-1 over all 3 iterations) as the uninterrupted run, not one of the resumed
    iterations only; the mid-epoch checkpoint carries the totals of the iterations before the stop."""
    from image_classification.training import lifecycle, trainer

    common = ["--data-backend", "synthetic", *e2e.tiny, "--num-classes", "3", "--prof", "3", "--epochs", "2",
              "--conv", "pedconv", "--no-autotune"]
    capsys.readouterr()
    assert trainer.main([*common, "--workspace", str(tmp_path / "full")]) == 0
    original = lifecycle.train_one_epoch

    def stop_in_epoch_one(comp, cfg, loader, epoch, raport, stop_requested, **kwargs):  # noqa: ANN001
        return original(comp, cfg, loader, epoch, raport, lambda: epoch == 1, **kwargs)

    monkeypatch.setattr(lifecycle, "train_one_epoch", stop_in_epoch_one)
    assert trainer.main([*common, "--workspace", str(tmp_path / "part")]) == 128 + signal.SIGTERM
    monkeypatch.setattr(lifecycle, "train_one_epoch", original)
    saved = load_checkpoint(tmp_path / "part" / "checkpoint.pth.tar")
    assert saved["step_in_epoch"] == 1 and saved["epoch_totals"]["samples"] == 4
    assert trainer.main([*common, "--resume", "auto", "--workspace", str(tmp_path / "part")]) == 0
    summaries = [{r["step"][0]: r["data"] for r in _epoch_records(read_raport(tmp_path / w / "raport.json"))
                  if "train.loss" in r["data"]} for w in ("full", "part")]
    for metric in ("train.loss", "train.infomax", "train.top1"):
        assert summaries[1][1][metric] == pytest.approx(summaries[0][1][metric], rel=1e-6), metric
    capsys.readouterr()
