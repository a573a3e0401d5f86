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
