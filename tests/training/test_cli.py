"""main.py's command line: DLE flag names, --config recipes, and one-line errors with status 2."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from image_classification.training.cli import build_parser, parse_args

ISSUE_FLAGS = [
    "--data-backend", "--dataset", "--arch", "--conv", "--dynamic", "--placement", "--model-config", "--num-classes",
    "--image-size", "-j", "-b", "--optimizer-batch-size", "--lr", "--warmup", "--lr-schedule", "--mom", "--wd",
    "--bn-weight-decay", "--nesterov", "--label-smoothing", "--mixup", "--epochs", "--run-epochs",
    "--infomax-weight", "--amp", "--amp-dtype", "--static-loss-scale", "--memory-format", "--use-ema", "--seed",
    "--print-freq", "--raport-file", "--workspace", "--resume", "--pretrained-weights", "--evaluate",
    "--training-only", "--no-checkpoints", "--checkpoint-filename", "--gather-checkpoints", "--prof", "--config",
]

# The authors' README training command with its line continuations fixed (batch sizes adapted below).
AUTHORS_TRAIN = """/data/imagenet \\
    --data-backend pytorch \\
    --raport-file raport.json \\
    -j8 -p 100 \\
    --lr 0.512 \\
    --optimizer-batch-size 512 \\
    --warmup 8 \\
    --arch resnet18 \\
    --dynamic \\
    -c fanin \\
    --label-smoothing 0.1 \\
    --lr-schedule cosine \\
    --mom 0.875 \\
    --wd 3.0517578125e-05 \\
    -b 64 \\
    --epochs 250 \\
    --mixup 0.2"""


def _error(capsys: pytest.CaptureFixture, argv: list) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("main.py: error: ")
    return lines[-1]


@pytest.fixture
def ws(tmp_path: Path) -> list:
    return ["--workspace", str(tmp_path / "ws")]


def test_help_lists_every_flag_of_the_issue() -> None:
    text = build_parser().format_help()
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
    assert "DATA" in text


def test_no_type_bool_anywhere() -> None:
    for action in build_parser()._actions:
        assert action.type is not bool, action.dest


def test_authors_training_command_parses(ws: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = parse_args(shlex.split(AUTHORS_TRAIN.replace("\\\n", " ")) + ws)
    assert args.conv == "pedconv" and args.dynamic
    assert (args.lr, args.optimizer_batch_size, args.batch_size, args.warmup) == (0.512, 512, 64, 8)
    assert (args.momentum, args.weight_decay, args.mixup, args.label_smoothing) == (0.875, 3.0517578125e-05, 0.2, 0.1)
    assert (args.workers, args.print_freq, args.model_config, args.lr_schedule) == (8, 100, "fanin", "cosine")


def test_optimizer_batch_defaults_to_batch_times_world(ws: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = parse_args(["--data-backend", "synthetic", "-b", "5", *ws])
    assert args.optimizer_batch_size == 15


def test_optimizer_batch_not_a_multiple(capsys: pytest.CaptureFixture, ws: list,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _error(capsys, ["--data-backend", "synthetic", "-b", "4", "--optimizer-batch-size", "12", *ws])
    assert "--optimizer-batch-size 12" in line and "4 x 2 = 8" in line


def test_unknown_arch_lists_valid(capsys: pytest.CaptureFixture, ws: list) -> None:
    line = _error(capsys, ["--data-backend", "synthetic", "--arch", "resnet19", *ws])
    assert "resnet19" in line and "resnet18" in line


def test_unknown_conv_lists_valid(capsys: pytest.CaptureFixture, ws: list) -> None:
    line = _error(capsys, ["--data-backend", "synthetic", "--conv", "fancyconv", *ws])
    assert "fancyconv" in line and "static" in line


def test_dynamic_conflicts_with_other_conv(capsys: pytest.CaptureFixture, ws: list) -> None:
    line = _error(capsys, ["--data-backend", "synthetic", "--dynamic", "--conv", "static", *ws])
    assert "--dynamic" in line


def test_workspace_not_writable(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _error(capsys, ["--data-backend", "synthetic", "--workspace", str(blocker / "ws")])
    assert "--workspace" in line
    assert not (blocker.parent / "ws").exists()


def test_missing_data_argument(capsys: pytest.CaptureFixture, ws: list) -> None:
    assert "DATA is required" in _error(capsys, ["--data-backend", "pytorch", *ws])


def test_missing_checkpoint_file(capsys: pytest.CaptureFixture, ws: list, tmp_path: Path) -> None:
    line = _error(capsys, ["--data-backend", "synthetic", "--resume", str(tmp_path / "nope.pth.tar"), *ws])
    assert "nope.pth.tar" in line


def test_config_values_and_command_line_override(tmp_path: Path, ws: list) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "data-backend: synthetic\narch: cifar_resnet20\nlr: 0.3\nlabel_smoothing: 0.1\nbn-weight-decay: true\n"
        "no-checkpoints: true\nlr-steps: [2, 4]\nuse-ema: true\nconv: pedconv:rank=2\n"
    )
    args = parse_args(["--config", str(config), "--lr", "0.05", *ws])
    assert args.data_backend == "synthetic" and args.arch == "cifar_resnet20"
    assert args.lr == 0.05 and args.label_smoothing == 0.1 and args.bn_weight_decay
    assert args.save_checkpoints is False and args.lr_steps == [2, 4] and args.use_ema == 0.9999
    assert args.conv.startswith("pedconv") and "rank=2" in args.conv


@pytest.mark.parametrize(
    "content, needle",
    [("learning-rate: 0.1\n", "unknown key(s)"), ("lr-schedule: polynomial\n", "invalid choice"),
     ("lr: fast\n", "invalid value"), ("- a\n- b\n", "mapping"), ("amp: maybe\n", "true or false")],
)
def test_bad_config(capsys: pytest.CaptureFixture, tmp_path: Path, ws: list, content: str, needle: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert needle in _error(capsys, ["--config", str(config), "--data-backend", "synthetic", *ws])


def test_missing_config_file(capsys: pytest.CaptureFixture, tmp_path: Path, ws: list) -> None:
    assert "cannot read --config" in _error(capsys, ["--config", str(tmp_path / "none.yaml"), *ws])


def test_use_ema_flag_forms(ws: list) -> None:
    base = ["--data-backend", "synthetic", *ws]
    assert parse_args(base).use_ema is None
    assert parse_args([*base, "--use-ema"]).use_ema == 0.9999
    assert parse_args([*base, "--use-ema", "0.99"]).use_ema == 0.99


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--lr", "nan"], "--lr: must be a finite number"),
        (["--lr", "inf"], "--lr: must be a finite number"),
        (["--end-lr", "inf"], "--end-lr: must be a finite number"),
        (["--lr-steps", "-5", "1000"], "--lr-steps: must be >= 0"),
        (["--lr-decay", "-3"], "--lr-decay: must be > 0"),
        (["--lr-decay", "nan"], "--lr-decay: must be a finite number"),
        (["--static-loss-scale", "nan"], "--static-loss-scale: must be a finite number"),
        (["--use-ema", "nan"], "--use-ema: must be a finite number"),
        (["--mom", "2"], "--mom must be in [0, 1), got 2.0"),
        (["--run-epochs", "0"], "--run-epochs must be >= 1"),
        (["--prof", "0"], "--prof must be >= 1"),
        (["--seed", str(2**40)], "--seed must be in [0, 4294967295]"),
        (["--seed", "1e23"], "invalid int value"),
        (["--checkpoint-filename", "sub/x.pth.tar"], "--checkpoint-filename must be a plain file name"),
        (["--checkpoint-filename", "model_best.pth.tar"], "reserved for the best model"),
        (["--evaluate"], "--evaluate needs weights"),
        (["--precise-bn", "-1"], "--precise-bn: must be >= 0"),
        (["--dist-timeout", "0"], "--dist-timeout: must be > 0"),
    ],
)
def test_bad_numbers_and_combinations(capsys: pytest.CaptureFixture, ws: list, flags: list, needle: str) -> None:
    assert needle in _error(capsys, ["--data-backend", "synthetic", *flags, *ws])


def test_resume_file_with_pretrained_weights(capsys: pytest.CaptureFixture, ws: list, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth.tar"
    weights.write_bytes(b"x")
    line = _error(capsys, ["--data-backend", "synthetic", "--resume", str(weights), "--pretrained-weights",
                           str(weights), *ws])
    assert "--resume and --pretrained-weights exclude each other" in line and "--resume auto" in line


def test_cuda_without_a_gpu(capsys: pytest.CaptureFixture, ws: list, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: CUDA is not available" in _error(capsys, ["--data-backend", "synthetic", "--device", "cuda",
                                                                     *ws])


def test_raport_file_that_is_a_directory(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "ws" / "r").mkdir(parents=True)
    line = _error(capsys, ["--data-backend", "synthetic", "--workspace", str(tmp_path / "ws"), "--raport-file", "r"])
    assert "--raport-file 'r' is a directory" in line


@pytest.mark.parametrize(
    "content, needle",
    [("lr: true\n", "config key 'lr': expected a number, got True"),
     ("lr: [0.1, 0.2]\n", "config key 'lr': expected a single value, got a list"),
     ("lr: null\n", "config key 'lr': null is not a value"),
     ("workspace: null\n", "config key 'workspace': null is not a value"),
     ("lr: {a: 1}\n", "config key 'lr': expected a single value, got a mapping"),
     ("lr-steps: []\n", "config key 'lr-steps': expected at least one value"),
     ("lr-steps: [10, true]\n", "config key 'lr-steps': expected a number, got True"),
     ("data: true\n", "config key 'data': expected a string, got True"),
     ("lr: .nan\n", "must be a finite number"),
     ("seed: 100000000000000000000000\n", "--seed must be in")],
)
def test_bad_config_values(capsys: pytest.CaptureFixture, tmp_path: Path, ws: list, content: str, needle: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert needle in _error(capsys, ["--config", str(config), "--data-backend", "synthetic", *ws])


def test_non_utf8_config(capsys: pytest.CaptureFixture, tmp_path: Path, ws: list) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes("arch: r\xe9snet\n".encode("latin-1"))
    line = _error(capsys, ["--config", str(config), "--data-backend", "synthetic", *ws])
    assert "latin1.yaml" in line and ("UTF-8" in line or "utf-8" in line)


def test_numbers_in_string_keys_taken_as_written(tmp_path: Path, ws: list) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("data-backend: synthetic\nraport-file: 2024\nseed: null\n")
    args = parse_args(["--config", str(config), *ws])
    assert args.raport_file == "2024" and args.seed is None


# ------------------------------------------------------------------ issue 13: adversarial and EfficientNet flags
NEW_FLAGS = ["--optimizer", "--optimizer-eps", "--rmsprop-alpha", "--lr-decay-epochs", "--augmentation",
             "--interpolation", "--drop-path", "--adv-train", "--adv-replays", "--adv-eps", "--adv-step-size",
             "--attack", "--attack-steps", "--attack-eps", "--attack-step-size", "--attack-start"]


def test_help_lists_the_new_flags() -> None:
    text = build_parser().format_help()
    for flag in NEW_FLAGS:
        assert flag in text, flag


def test_adversarial_defaults_follow_the_paper(ws: list, tmp_path: Path) -> None:
    base = ["--data-backend", "synthetic", *ws]
    natural = parse_args(base)
    assert (natural.adv_train, natural.adv_replays, natural.adv_eps, natural.attack, natural.attack_steps) == (
        "none", None, None, "none", None)
    free = parse_args([*base, "--adv-train", "free"])
    assert (free.adv_replays, free.adv_eps, free.adv_step_size) == (4, 4.0, 4.0)  # Shafahi et al.: m 4, eps 4, step eps
    weights = tmp_path / "w.pth.tar"
    weights.write_bytes(b"x")
    attack = parse_args([*base, "--evaluate", "--pretrained-weights", str(weights), "--attack", "pgd",
                         "--attack-steps", "50", "10", "10"])
    assert (attack.attack_steps, attack.attack_eps, attack.attack_step_size, attack.attack_start) == (
        [10, 50], 4.0, 1.0, "random")


def test_optimizer_defaults(ws: list) -> None:
    base = ["--data-backend", "synthetic", *ws]
    assert (parse_args(base).optimizer, parse_args(base).rmsprop_alpha) == ("sgd", None)
    rms = parse_args([*base, "--optimizer", "rmsprop", "--lr-schedule", "exponential", "--lr-decay", "0.97",
                      "--lr-decay-epochs", "2.4"])
    assert (rms.optimizer, rms.rmsprop_alpha, rms.optimizer_eps, rms.lr_decay_epochs) == ("rmsprop", 0.9, None, 2.4)


def test_a_recipes_options_of_a_switched_off_feature_are_dropped(tmp_path: Path, ws: list) -> None:
    """--optimizer sgd over an RMSProp recipe (or --adv-train none over a free-training one) is not an error:
    the recipe's RMSProp / adversarial options are simply not used."""
    config = tmp_path / "recipe.yaml"
    config.write_text("data-backend: synthetic\noptimizer: rmsprop\noptimizer-eps: 0.001\nrmsprop-alpha: 0.9\n"
                      "lr-schedule: exponential\nlr-decay-epochs: 2.4\nadv-train: free\nadv-replays: 4\n")
    args = parse_args(["--config", str(config), "--optimizer", "sgd", "--lr-schedule", "cosine", "--adv-train",
                       "none", *ws])
    assert (args.optimizer_eps, args.rmsprop_alpha, args.lr_decay_epochs, args.adv_replays) == (None, None, None, None)
    kept = parse_args(["--config", str(config), *ws])
    assert (kept.optimizer_eps, kept.rmsprop_alpha, kept.lr_decay_epochs, kept.adv_replays) == (0.001, 0.9, 2.4, 4)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--adv-replays", "4"], "--adv-replays without --adv-train free"),
        (["--adv-train", "free", "--adv-replays", "0"], "--adv-replays: must be a positive integer, got 0"),
        (["--adv-train", "free", "--adv-eps", "-4"], "--adv-eps: must be > 0, got -4"),
        (["--adv-train", "free", "--adv-eps", "300"], "--adv-eps is in 1/255 of the pixel range: at most 255, got 300"),
        (["--adv-train", "free", "--adv-step-size", "nan"], "--adv-step-size: must be a finite number"),
        (["--adv-train", "free", "--mixup", "0.2"], "--adv-train free and --mixup exclude each other"),
        (["--adv-train", "fast"], "argument --adv-train: invalid choice: 'fast'"),
        (["--attack", "pgd"], "--attack measures a trained model: it needs --evaluate"),
        (["--attack-steps", "10"], "--attack-steps without --attack pgd"),
        (["--attack", "fgsm"], "argument --attack: invalid choice: 'fgsm'"),
        (["--attack", "pgd", "--attack-steps", "0"], "--attack-steps: must be a positive integer, got 0"),
        (["--attack", "pgd", "--attack-eps", "0"], "--attack-eps: must be > 0, got 0"),
        (["--attack", "pgd", "--attack-start", "zero"], "argument --attack-start: invalid choice"),
        (["--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
        (["--optimizer", "rmsprop", "--nesterov"], "--nesterov is an SGD option"),
        (["--optimizer-eps", "1e-3"], "--optimizer-eps without --optimizer rmsprop or adamw"),
        (["--optimizer", "rmsprop", "--optimizer-eps", "0"], "--optimizer-eps: must be > 0, got 0"),
        (["--optimizer", "adamw", "--rmsprop-alpha", "0.9"], "--rmsprop-alpha without --optimizer rmsprop"),
        (["--optimizer", "rmsprop", "--rmsprop-alpha", "1"], "--rmsprop-alpha: expected a number in [0, 1)"),
        (["--lr-schedule", "exponential"], "--lr-schedule exponential needs --lr-decay-epochs"),
        (["--lr-decay-epochs", "2.4"], "--lr-decay-epochs without --lr-schedule exponential"),
        (["--lr-schedule", "exponential", "--lr-decay-epochs", "0"], "--lr-decay-epochs: must be > 0, got 0"),
        (["--arch", "resnet18", "--drop-path", "0.2"], "--drop-path: --arch resnet18 has no stochastic depth"),
        (["--arch", "efficientnet_b0", "--drop-path", "1.5"], "--drop-path: expected a number in [0, 1)"),
        (["--augmentation", "cutmix"], "argument --augmentation: invalid choice: 'cutmix'"),
        (["--interpolation", "lanczos"], "argument --interpolation: invalid choice: 'lanczos'"),
    ],
)
def test_bad_new_flags(capsys: pytest.CaptureFixture, ws: list, tmp_path: Path, flags: list, needle: str) -> None:
    weights = tmp_path / "w.pth.tar"
    weights.write_bytes(b"x")
    evaluate = ["--evaluate", "--pretrained-weights", str(weights)] if flags[:2] == ["--attack", "pgd"] and \
        len(flags) > 2 else []
    assert needle in _error(capsys, ["--data-backend", "synthetic", *flags, *evaluate, *ws])


def test_the_data_backend_choices_come_from_the_registry(capsys: pytest.CaptureFixture) -> None:
    """A backend added with register_backend is a valid --data-backend (the parser asks list_backends())."""
    from image_classification.data import list_backends, register_backend, unregister_backend

    with pytest.raises(SystemExit):
        build_parser().parse_args(["/data", "--data-backend", "my-loader"])
    assert "invalid choice: 'my-loader'" in capsys.readouterr().err

    @register_backend("my-loader")
    def build(cfg):  # pragma: no cover - never built here
        raise AssertionError("not called by the parser")

    try:
        assert "my-loader" in list_backends()
        assert build_parser().parse_args(["/data", "--data-backend", "my-loader"]).data_backend == "my-loader"
    finally:
        unregister_backend("my-loader")
    assert "my-loader" not in list_backends()


@pytest.mark.parametrize("key", ["trust-checkpoints", "trust_checkpoints"])
def test_a_recipe_cannot_turn_on_checkpoint_code_execution(capsys: pytest.CaptureFixture, tmp_path: Path, ws: list,
                                                           key: str) -> None:
    """A downloaded recipe naming a pickled payload as --pretrained-weights must not also enable unpickling it."""
    config = tmp_path / "trust.yaml"
    config.write_text(f"{key}: true\ndata-backend: synthetic\n")
    line = _error(capsys, ["--config", str(config), *ws])
    assert f"key {key!r} is accepted on the command line only" in line and "pass --trust-checkpoints" in line


def test_trust_checkpoints_on_the_command_line_warns(capsys: pytest.CaptureFixture, ws: list,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    args = parse_args(["--data-backend", "synthetic", "--trust-checkpoints", *ws])
    assert args.trust_checkpoints
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["main.py: warning: --trust-checkpoints: checkpoints are loaded with full unpickling, which runs "
                   "any code a file carries; use it only for files whose source you trust"]
    parse_args(["--data-backend", "synthetic", *ws])
    assert capsys.readouterr().err == ""


def test_a_yaml_alias_bomb_in_a_valid_key_is_refused_quickly(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                             ws: list) -> None:
    """Nested aliases (9**9 items once expanded) under a real key: the error shows a few items, never the expansion
    (formatting it whole took all the machine's memory)."""
    levels = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    config = tmp_path / "bomb.yaml"
    config.write_text(f"lr-steps: [{', '.join(levels)}]\n")
    import time

    started = time.perf_counter()
    line = _error(capsys, ["--config", str(config), "--data-backend", "synthetic", *ws])
    assert time.perf_counter() - started < 10
    assert "config key 'lr-steps': expected a number, got [1, 1, 1, 1, ...]" in line and len(line) < 400


def test_workers_default_to_the_cores_on_the_cpu(monkeypatch) -> None:
    """Every CPU run on 2 cores printed torch's 'This DataLoader will create 5 worker processes ... suggested max 2'
    twice: -j's default is 5 on a GPU (DeepLearningExamples') and the cores this process may use on the CPU."""
    import os

    import torch

    from image_classification.training.cli import default_workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_workers("auto") == default_workers("cpu") == max(1, min(5, cores))
    assert default_workers("cuda") == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # the node's processes share the cores
    assert default_workers("cpu") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_workers("auto") == 5


def test_the_resume_check_covers_every_training_flag() -> None:
    """The flags a --resume compares with the checkpoint are derived from the parser's optimizer and optimisation
    groups (adding a flag there needs no second list): every flag of the former hand-kept list, and the optimizer
    flags it had missed (--optimizer, --bn-weight-decay)."""
    from image_classification.training.cli import NOT_TRAINING_FLAGS, build_parser, training_flags
    from image_classification.training.optim import OPTIMIZER_GROUP

    derived = set(training_flags())
    former = {"lr", "epochs", "lr_schedule", "warmup", "lr_steps", "lr_decay", "end_lr", "momentum", "weight_decay",
              "nesterov", "optimizer_batch_size", "batch_size", "label_smoothing", "mixup", "infomax_weight", "use_ema",
              "precise_bn", "optimizer_eps", "rmsprop_alpha", "lr_decay_epochs", "augmentation", "interpolation",
              "adv_train", "adv_replays", "adv_eps", "adv_step_size", "bn_momentum", "drop_path"}
    assert former <= derived and {"optimizer", "bn_weight_decay"} <= derived
    parser = build_parser()
    [group] = [g for g in parser._action_groups if g.title == OPTIMIZER_GROUP]
    assert {a.dest for a in group._group_actions} <= derived and not derived & set(NOT_TRAINING_FLAGS)


def test_the_dense_tasks_share_the_optimizer_flags(tmp_path) -> None:  # noqa: ANN001
    """train_detection/train_segmentation read the same optimizer group as main.py, with the same checks."""
    import torch.nn as nn

    from image_classification.tools.train_segmentation import build_parser as segmentation_parser
    from image_classification.training.optim import check_optimizer_flags, optimizer_from_args

    parser = segmentation_parser()
    args = parser.parse_args([str(tmp_path), "--optimizer", "adamw", "--optimizer-eps", "1e-6", "--wd", "0.05"])
    check_optimizer_flags(args)
    optimizer = optimizer_from_args(nn.Linear(2, 2), args)
    assert type(optimizer).__name__ == "AdamW" and optimizer.param_groups[0]["eps"] == 1e-6
    bad = parser.parse_args([str(tmp_path), "--optimizer", "rmsprop", "--nesterov"])
    with pytest.raises(ValueError, match="--nesterov is an SGD option"):
        check_optimizer_flags(bad)
