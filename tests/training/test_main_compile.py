"""main.py --compile (training and evaluation), --print-paths and the path autotuner switches, end to end.

The compiled runs use ``--compile-backend aot_eager`` (Dynamo + AOTAutograd, the same graph capture as
inductor without its C++ builds, which take minutes on the CI machine); inductor itself is exercised per
operator in tests/dynamic/test_compile.py.
"""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.slow

COMMON = ["--arch", "cifar_resnet20", "--image-size", "16", "-j", "0", "--lr", "0.05", "--seed", "3", "-p", "1",
          "--conv", "pedconv"]
RESNET10 = [*COMMON, "--arch", "resnet10"]  # the later --arch wins


def graphs(stdout: str) -> int:
    match = re.search(r"torch\.compile: (\d+) graph\(s\) compiled", stdout)
    assert match, stdout[-2000:]
    return int(match.group(1))


def test_compiled_training_no_recompilation_storm_and_checkpoints_interchange(e2e, jpeg_folder, tmp_path):
    # 12 train / 9 val images at -b 5: train batches 5, 5 (the last partial one is dropped), val 5, 4.
    # ResNet-10 (8 PEDConv layers, stride 4 before layer1) halves ResNet-20's tracing time.
    compiled = tmp_path / "compiled"
    res = e2e.run([str(jpeg_folder), *RESNET10, "-b", "5", "--epochs", "2", "--compile", "--compile-backend",
                   "aot_eager", "--print-paths", "--workspace", str(compiled)])
    assert res.returncode == 0, res.stderr[-3000:]
    # static shapes: one graph for training, one per validation batch size, none added by the 2nd epoch
    assert graphs(res.stdout) == 3
    assert "PEDConv execution paths" in res.stdout
    assert re.search(r"layer1\.0\.conv1\s+5x64x4x4\s+train", res.stdout)
    assert re.search(r"layer1\.0\.conv1\s+4x64x4x4\s+eval", res.stdout)  # the smaller last batch is listed
    ckpt = torch.load(compiled / "checkpoint.pth.tar", map_location="cpu", weights_only=False)
    from image_classification.models import build_model

    plain = build_model("resnet10", "pedconv", num_classes=3, in_chans=3)
    assert set(ckpt["state_dict"]) == set(plain.state_dict())  # no _orig_mod. prefix: eager and compiled alike

    # the compiled run's checkpoint evaluates eagerly and compiled, with the same result
    evals = [e2e.run([str(jpeg_folder), *RESNET10, "-b", "5", "--evaluate", "--pretrained-weights",
                      str(compiled / "checkpoint.pth.tar"), "--workspace", str(tmp_path / f"eval{i}"), *extra])
             for i, extra in enumerate(([], ["--compile", "--compile-backend", "aot_eager"]))]
    for r in evals:
        assert r.returncode == 0, r.stderr[-3000:]
    top1 = [re.search(r"evaluation: top1 ([0-9.]+)", r.stdout).group(1) for r in evals]
    assert top1[0] == top1[1]


def test_autotuned_training_prints_tuned_paths(e2e, jpeg_folder, tmp_path):
    res = e2e.run([str(jpeg_folder), *COMMON, "-b", "6", "--epochs", "1", "--print-paths", "--workspace",
                   str(tmp_path / "ws")], env={"PEDCONV_AUTOTUNE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if re.match(r"layer\d\.\d\.conv\d\s", line)]
    # tuned before the first epoch for both batch shapes (or the only applicable path)
    assert rows and all(re.search(r" (tuned|only) ", row) for row in rows)
    assert any(" eval " in row for row in rows) and any(" train " in row for row in rows)
    res = e2e.run([str(jpeg_folder), *COMMON, "-b", "6", "--epochs", "1", "--print-paths", "--deterministic",
                   "--workspace", str(tmp_path / "ws2")], env={"PEDCONV_AUTOTUNE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if re.match(r"layer\d\.\d\.conv\d\s", line)]
    assert rows and all(" heuristic " in row for row in rows)  # --deterministic implies --no-autotune


def test_bad_compile_backend_is_one_line(e2e, tmp_path):
    res = e2e.run(["--data-backend", "synthetic", *COMMON, "--compile", "--compile-backend", "nope",
                   "--workspace", str(tmp_path)])
    assert res.returncode == 2
    assert "--compile-backend 'nope' is not a torch.compile backend" in res.stderr.strip().splitlines()[-1]


def test_sigterm_while_compiling_stops_at_once(e2e, tmp_path):
    """--compile says what it compiles, then compiles before the first step; a SIGTERM during that is acted on
    at once (nothing trained yet, nothing to save) instead of after minutes of inductor work."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-u", e2e.main, "--data-backend", "synthetic", "--arch", "cifar_resnet20", "--conv",
               "pedconv", "--num-classes", "4", "--image-size", "12", "-b", "4", "--epochs", "1", "--prof", "2", "-j",
               "0", "--compile", "--workspace", str(tmp_path / "ws")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(command, cwd=e2e.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline and "compiling the model" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-2000:]
        assert "torch.compile, backend inductor" in line and "SIGTERM/SIGINT stop it at once" in line
        time.sleep(1.0)  # inside dynamo's tracing
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        waited = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received while compiling" in err and "Traceback" not in err
    assert waited < 20, waited  # inductor alone takes minutes here
    assert not (tmp_path / "ws" / "checkpoint.pth.tar").exists()
