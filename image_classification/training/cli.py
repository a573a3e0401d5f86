"""Command line of ``main.py``: DeepLearningExamples' flag names, YAML recipes, up-front validation.

``parse_args`` reads ``--config FILE.yaml`` first (:func:`.config.load_config`: keys are long flag names, with
dashes or underscores), installs its values as parser defaults and parses the command line again, so explicit
flags win over the recipe. The choices of ``--data-backend`` and ``--dataset`` come from the data registry
(:func:`image_classification.data.list_backends`, so a backend added with ``register_backend`` is accepted).
Everything that can be checked before touching data or disk is checked here and reported like an argparse
error: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence, Tuple

from image_classification.argparsing import (
    ArgumentParser,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from image_classification.data import list_backends, list_datasets
from image_classification.data.augment import AUGMENTATIONS, INTERPOLATIONS
from image_classification.reporting.tensorboard import foreign_run, require_tensorboard

from .checkpoint import TRUST_WARNING, add_trust_flag, directory_write_problem, nearest_existing_directory
from .config import load_config
from .distributed import env_world_size
from .optim import LR_SCHEDULES, OPTIMIZER_GROUP, add_optimizer_flags, check_optimizer_flags

__all__ = ["build_parser", "parse_args", "resolve_conv", "training_flags", "DEFAULT_DYNAMIC_SPEC", "FALLBACK_ARCH",
           "FALLBACK_DATASET", "FALLBACK_PLACEMENT"]

DEFAULT_DYNAMIC_SPEC = "pedconv"
#: --arch / --placement when neither the command line, the recipe nor a --resume/--pretrained-weights
#: checkpoint names one
FALLBACK_ARCH = "resnet50"
FALLBACK_DATASET = "imagenet"
FALLBACK_PLACEMENT = "paper"
MAX_SEED = 2**32 - 1


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "data", metavar="DATA", nargs="?", default=None,
        help="dataset directory: ImageNet layout DATA/train/<class>/*, DATA/val/<class>/* for imagenet; the "
        "IDX .gz directory for fashion-mnist (default /usr/share/datasets/fashion-mnist); the CIFAR-10 python "
        "batches for cifar10; unused by --data-backend synthetic",
    )
    group.add_argument("--data-backend", default="pytorch", choices=list_backends(),
                       help="data loader (default: pytorch)")
    group.add_argument("--dataset", default=None, choices=list_datasets(),
                       help=f"dataset layout (default: the one a --resume/--pretrained-weights checkpoint records, "
                       f"else {FALLBACK_DATASET})")
    group.add_argument("--image-size", type=positive_int, default=None,
                       help="train/val crop size (default: 224 imagenet, 28 fashion-mnist, 32 cifar10)")
    group.add_argument("--num-classes", type=positive_int, default=None,
                       help="classifier outputs (default: the number of classes in the data)")
    group.add_argument("-j", "--workers", type=non_negative_int, default=None, metavar="N",
                       help="data loading workers per process (default: 5 on a GPU, DeepLearningExamples' value; "
                            "on the CPU the cores this process may use, at most 5)")
    group.add_argument("-b", "--batch-size", type=positive_int, default=256, metavar="N",
                       help="mini-batch size per process (default: 256)")
    group.add_argument("--val-batch-size", type=positive_int, default=None, metavar="N",
                       help="validation batch size per process (default: --batch-size)")
    group.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                       help="train on a random subset of N images drawn with --seed (default: all; without "
                       "--seed each run draws another)")
    group.add_argument("--val-subset", type=positive_int, default=None, metavar="N",
                       help="validate on a random subset of N images drawn with --seed (default: all; give --seed "
                       "to compare runs on the same images)")
    group.add_argument("--augmentation", default="none", choices=AUGMENTATIONS,
                       help="automatic augmentation of the training images after crop and flip: AutoAugment "
                       "(ImageNet policy), RandAugment (N=2, M=9) or TrivialAugment Wide; torchvision's on the "
                       "pytorch backend, DALI's own on dali-cpu/dali-gpu (default: none)")
    group.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                       help="resampling filter of the train crop and the val resize (default: bilinear; "
                       "EfficientNet: bicubic)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--arch", "-a", default=None, metavar="ARCH",
                       help=f"architecture (default: the one recorded in the --resume/--pretrained-weights "
                       f"checkpoint, else {FALLBACK_ARCH})")
    group.add_argument("--conv", default=None, metavar="SPEC",
                       help="convolution operator spec, e.g. static, pedconv, pedconv:rank=4, dcd, dyconv:k=4, "
                       "condconv:k=8, involution (default: static, or the operator stored in the checkpoint "
                       "given to --resume/--pretrained-weights)")
    group.add_argument("--dynamic", action="store_true",
                       help=f"use the paper's dynamic convolution: same as --conv {DEFAULT_DYNAMIC_SPEC}")
    group.add_argument("--placement", default=None,
                       help="which convolutions become dynamic (default: the checkpoint's, else the operator's: "
                       f"{FALLBACK_PLACEMENT} = all but the stem, the 1x1 shortcuts and the classifier; involution: "
                       "paper+last, one per residual block as in RedNet)")
    group.add_argument("-c", "--model-config", default="classic", choices=("classic", "fanin", "fanout"),
                       help="weight initialisation (default: classic)")
    group.add_argument("--dropout", type=probability, default=None, metavar="P",
                       help="dropout before the classifier (default: the arch's own, e.g. 0.2 for MobileNetV2, "
                       "none for ResNets)")
    group.add_argument("--infomax-weight", type=non_negative_float, default=1e-3, metavar="LAMBDA",
                       help="weight of the PEDConv info-max loss (default: 1e-3)")
    group.add_argument("--memory-format", default="nchw", choices=("nchw", "nhwc"),
                       help="memory layout; nhwc = channels_last (default: nchw)")
    group.add_argument("--drop-path", type=probability, default=None, metavar="P",
                       help="stochastic depth (EfficientNet's drop-connect rate): block i of n skips its residual "
                       "branch for a sample with probability P * i / n; efficientnet_* only (default: the arch's "
                       "own, 0.2)")
    group.add_argument("--bn-momentum", type=probability, default=None, metavar="M",
                       help="BatchNorm running-statistics momentum in PyTorch's convention (weight of the new batch; "
                       "TensorFlow's 0.99 is 0.01) for every BatchNorm of the model (default: the arch's own, 0.1)")


#: the title of main.py's schedule and regularisation flags (the optimizer's are optim.add_optimizer_flags')
OPTIMISATION_GROUP = "optimisation"


def _add_optim_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(OPTIMISATION_GROUP)
    group.add_argument("--optimizer-batch-size", type=int, default=-1, metavar="N",
                       help="global batch per optimizer step; a multiple of batch size x processes, reached by "
                       "gradient accumulation (default: batch size x processes)")
    group.add_argument("--warmup", type=int, default=0, metavar="E", help="linear warmup epochs (default: 0)")
    group.add_argument("--lr-schedule", default="step", choices=LR_SCHEDULES,
                       help="decay after warmup; exponential: x --lr-decay every --lr-decay-epochs (default: step)")
    group.add_argument("--lr-steps", type=non_negative_int, nargs="+", default=[30, 60, 80], metavar="E",
                       help="epochs where the step schedule multiplies the lr by --lr-decay (default: 30 60 80)")
    group.add_argument("--lr-decay", type=positive_float, default=0.1,
                       help="step and exponential schedules' factor (default: 0.1; EfficientNet: 0.97)")
    group.add_argument("--end-lr", type=non_negative_float, default=0.0, help="final lr of linear/cosine (default: 0)")
    group.add_argument("--label-smoothing", type=probability, default=0.0, metavar="S",
                       help="label smoothing (default: 0)")
    group.add_argument("--mixup", type=non_negative_float, default=0.0, metavar="ALPHA",
                       help="mixup Beta(alpha, alpha); 0 disables (default: 0)")
    group.add_argument("--epochs", type=positive_int, default=90, help="epochs of the schedule (default: 90)")
    group.add_argument("--run-epochs", type=int, default=-1, metavar="N",
                       help="run only N epochs in this invocation (schedules spanning several jobs; default: all)")
    group.add_argument("--use-ema", type=finite_float, nargs="?", const=0.9999, default=None, metavar="DECAY",
                       help="keep and validate an exponential moving average of the weights (decay, default 0.9999)")
    group.add_argument("--precise-bn", type=non_negative_int, default=0, metavar="N",
                       help="before each validation and checkpoint, recompute every BatchNorm's statistics (model "
                       "and EMA) as the true average over N training batches, with the dynamic operators' training "
                       "noise off; 0 keeps the running averages (default: 0)")
    group.add_argument("--lr-decay-epochs", type=positive_float, default=None, metavar="E",
                       help="exponential schedule: multiply the lr by --lr-decay every E epochs, counted from the "
                       "start (EfficientNet: 2.4)")


def _add_precision_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision and hardware")
    group.add_argument("--amp", action="store_true", help="automatic mixed precision (torch.amp)")
    group.add_argument("--amp-dtype", default="fp16", choices=("fp16", "bf16"),
                       help="autocast dtype; fp16 uses a gradient scaler (default: fp16)")
    group.add_argument("--static-loss-scale", type=positive_float, default=None, metavar="S",
                       help="fixed fp16 loss scale (default: dynamic scaling)")
    group.add_argument("--dynamic-loss-scale", action="store_true",
                       help="dynamic fp16 loss scaling starting at --static-loss-scale (the default without it)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="compute device (default: cuda when available)")
    group.add_argument("--seed", type=int, default=None,
                       help=f"random seed in [0, {MAX_SEED}] (default: random, shared by all processes and recorded "
                       "in the raport)")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic cuDNN algorithms; implies --no-autotune")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (training and evaluation; static shapes, checkpoints keep "
                       "the plain parameter names)")
    group.add_argument("--compile-backend", default="inductor", metavar="NAME",
                       help="torch.compile backend for --compile (default: inductor; aot_eager isolates compiler "
                       "problems)")
    group.add_argument("--no-autotune", dest="autotune", action="store_false",
                       help="PEDConv path=auto: use the deterministic shape heuristic instead of timing the exact "
                       "paths of every layer once (also off with --deterministic or PEDCONV_AUTOTUNE=0)")
    group.add_argument("--autotune-budget", type=non_negative_float, default=10.0, metavar="SECONDS",
                       help="PEDConv path=auto: spend at most this long timing paths per process; layer shapes met "
                       "after it use the heuristic (choices are cached per machine in the workspace and in "
                       "$PEDCONV_CACHE_DIR or ~/.cache/pedconv, so later runs, --evaluate and resumes reuse them; "
                       "default: 10)")
    group.add_argument("--print-paths", action="store_true",
                       help="print the execution path every PEDConv layer uses (after the first epoch / evaluation)")
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                       help=argparse.SUPPRESS)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run control, logging and checkpoints")
    group.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="YAML recipe (keys: long flag names); flags on the command line override it")
    group.add_argument("--workspace", default="./", metavar="DIR", help="output directory (default: ./)")
    group.add_argument("--raport-file", default="raport.json", metavar="FILE",
                       help="DLLogger JSON-lines raport, relative to --workspace (default: raport.json)")
    group.add_argument("-p", "--print-freq", type=positive_int, default=10, metavar="N",
                       help="log every N iterations (default: 10)")
    group.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                       help="also write the raport's scalars as TensorBoard event files (rank 0) to DIR, relative to "
                       "--workspace (no DIR: the workspace itself); needs the tensorboard package")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="checkpoint to continue from ('auto': the workspace checkpoint if it exists)")
    group.add_argument("--pretrained-weights", default=None, metavar="PATH",
                       help="model weights to start from (this project's checkpoints or the authors' PEDConv)")
    group.add_argument("--evaluate", action="store_true", help="only validate the model and log the metrics")
    group.add_argument("--training-only", action="store_true", help="skip validation")
    group.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false",
                       help="do not write checkpoints")
    group.add_argument("--checkpoint-filename", default="checkpoint.pth.tar", metavar="NAME",
                       help="checkpoint file name in the workspace (default: checkpoint.pth.tar)")
    group.add_argument("--gather-checkpoints", type=int, nargs="?", const=-1, default=0, metavar="N",
                       help="also keep per-epoch copies: the last N (no value, or -1: all)")
    group.add_argument("--prof", type=int, default=-1, metavar="N",
                       help="stop each epoch after N iterations (smoke and throughput runs)")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run in a workspace that already holds one (its checkpoints and raport are "
                       "replaced); without it such a workspace is refused unless --resume is given")
    add_trust_flag(group, help="load --resume/--pretrained-weights with full unpickling, allowing objects outside "
                   "torch's weights_only allowlist: this can run code, use it only for files you trust (command line "
                   "only: a recipe cannot set it)")
    group.add_argument("--dist-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                       help="under torchrun: give up when a collective waits longer than this for a stalled or "
                       "lost rank, naming it (default: 600)")


def _add_adversarial_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "adversarial training and robustness (PEDConv Table 4); budgets in 1/255 of the [0, 1] pixel range")
    group.add_argument("--adv-train", default="none", choices=("none", "free"),
                       help="free: 'free' adversarial training (Shafahi et al., NeurIPS 2019): each mini-batch is "
                       "replayed --adv-replays times, each replay is an optimizer step, and one l_inf perturbation "
                       "kept across replays and batches ascends the loss with the same backward pass; divide "
                       "--epochs by the replays (default: none)")
    group.add_argument("--adv-replays", type=positive_int, default=None, metavar="M",
                       help="free adversarial training: replays m per mini-batch (default: 4)")
    group.add_argument("--adv-eps", type=positive_float, default=None, metavar="EPS",
                       help="free adversarial training: l_inf bound of the perturbation, in 1/255 (default: 4)")
    group.add_argument("--adv-step-size", type=positive_float, default=None, metavar="S",
                       help="free adversarial training: perturbation step per replay, in 1/255 (default: --adv-eps)")
    group.add_argument("--attack", default="none", choices=("none", "pgd"),
                       help="with --evaluate: also measure top-1 under an l_inf PGD attack (Madry et al., ICLR "
                       "2018) on the normalised-input model, projected and clamped in pixel space (default: none)")
    group.add_argument("--attack-steps", type=positive_int, nargs="+", default=None, metavar="K",
                       help="PGD iterations; several values run several attacks, e.g. 10 50 (default: 10)")
    group.add_argument("--attack-eps", type=positive_float, default=None, metavar="EPS",
                       help="PGD l_inf bound, in 1/255 (default: 4)")
    group.add_argument("--attack-step-size", type=positive_float, default=None, metavar="S",
                       help="PGD step, in 1/255 (default: 1)")
    group.add_argument("--attack-start", default=None, choices=("random", "clean"),
                       help="PGD start: random = uniform in the eps ball (seeded by --seed), clean = the image "
                       "itself (default: random)")


#: flags outside the optimizer and optimisation groups whose change on --resume alters the training
OTHER_TRAINING_FLAGS = ("batch_size", "infomax_weight", "augmentation", "interpolation", "adv_train", "adv_replays",
                        "adv_eps", "adv_step_size", "bn_momentum", "drop_path")
#: flags of those groups that do not: how much of the schedule this job runs
NOT_TRAINING_FLAGS = ("run_epochs",)


def training_flags() -> Tuple[str, ...]:
    """The flags whose change on ``--resume`` alters the training (the run is told they are taken from the command
    line): every flag of the optimizer and optimisation groups but :data:`NOT_TRAINING_FLAGS`, derived from the
    parser, plus :data:`OTHER_TRAINING_FLAGS`."""
    parser = build_parser()
    grouped = [action.dest for group in parser._action_groups if group.title in (OPTIMIZER_GROUP, OPTIMISATION_GROUP)
               for action in group._group_actions if action.dest not in NOT_TRAINING_FLAGS]
    return tuple(grouped) + OTHER_TRAINING_FLAGS


def build_parser() -> argparse.ArgumentParser:
    """The complete ``main.py`` parser (DeepLearningExamples names plus the dynamic-conv options)."""
    parser = ArgumentParser(
        prog="main.py",
        description="Train or evaluate an image classifier with static or dynamic convolutions "
        "(PEDConv, DCD, DY-Conv, CondConv, Involution, ODConv). Single process, or DDP under torchrun/multiproc.py.",
    )
    _add_data_flags(parser)
    _add_model_flags(parser)
    add_optimizer_flags(parser, lr=0.1, weight_decay=1e-4)
    _add_optim_flags(parser)
    _add_precision_flags(parser)
    _add_run_flags(parser)
    _add_adversarial_flags(parser)
    return parser


def resolve_conv(args: argparse.Namespace) -> Optional[str]:
    """The operator spec requested on the command line (``--dynamic`` = pedconv), or None if unspecified."""
    if args.dynamic:
        if args.conv is not None and not args.conv.strip().lower().startswith(DEFAULT_DYNAMIC_SPEC):
            raise ValueError(f"--dynamic means --conv {DEFAULT_DYNAMIC_SPEC} and conflicts with --conv {args.conv}")
        return args.conv or DEFAULT_DYNAMIC_SPEC
    return args.conv


def _validate_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from image_classification.dynamic import parse_spec
    from image_classification.models import list_archs

    if args.arch is None and args.resume is None and args.pretrained_weights is None:
        args.arch = FALLBACK_ARCH  # no checkpoint can name one (build.infer_model_fields does it otherwise)
    archs = list(list_archs())
    if args.arch is not None and args.arch not in archs:
        parser.error(f"unknown --arch {args.arch!r}; valid: {', '.join(archs)}")
    try:
        spec = resolve_conv(args)
        if spec is not None:
            args.conv = str(parse_spec(spec))
    except ValueError as exc:
        parser.error(f"--conv: {exc}")
    if args.placement is None and args.resume is None and args.pretrained_weights is None:
        from image_classification.dynamic.registry import operator_class

        args.placement = operator_class(args.conv or "static").default_placement  # else: the checkpoint's


def default_workers(device: str) -> int:
    """``-j``'s default: 5 per process on a GPU (DeepLearningExamples'); on the CPU the cores this process may use
    (shared by the processes of this node), at most 5, so torch's DataLoader does not warn that 5 workers exceed a
    2-core machine's suggested maximum."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return 5
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(5, cores // local))


def _validate_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        world = env_world_size()
    except ValueError as exc:  # a launcher variable out of the job: name it, not a flag computed from it
        parser.error(str(exc))
    step_batch = args.batch_size * world
    if args.optimizer_batch_size == -1:
        args.optimizer_batch_size = step_batch
    if args.optimizer_batch_size < 1 or args.optimizer_batch_size % step_batch:
        parser.error(
            f"--optimizer-batch-size {args.optimizer_batch_size} is not a multiple of batch size x processes "
            f"({args.batch_size} x {world} = {step_batch})"
        )
    if args.use_ema is not None and not 0.0 < args.use_ema < 1.0:
        parser.error(f"--use-ema decay must be in (0, 1), got {args.use_ema}")
    if args.workers is None:
        args.workers = default_workers(args.device)
    if args.warmup < 0 or args.warmup > args.epochs:
        parser.error(f"--warmup must be between 0 and --epochs ({args.epochs}), got {args.warmup}")
    if args.evaluate and args.training_only:
        parser.error("--evaluate and --training-only exclude each other")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    for flag, value in (("--run-epochs", args.run_epochs), ("--prof", args.prof)):
        if value == 0 or value < -1:
            parser.error(f"{flag} must be >= 1 (or -1: no limit), got {value}")
    if args.gather_checkpoints < -1:
        parser.error(f"--gather-checkpoints must be >= 0, or -1 / no value to keep all, got "
                     f"{args.gather_checkpoints}")
    if args.evaluate and args.pretrained_weights is None and args.resume is None:
        parser.error("--evaluate needs weights: give --pretrained-weights FILE (or --resume FILE)")
    if args.resume not in (None, "auto") and args.pretrained_weights is not None:
        parser.error("--resume and --pretrained-weights exclude each other (a resumed run continues from its own "
                     "weights); use --resume auto to start from --pretrained-weights only when there is no checkpoint")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine (use --device cpu)")


ADVERSARIAL_DEFAULTS = {"adv_replays": 4, "adv_eps": 4.0}
ATTACK_DEFAULTS = {"attack_steps": [10], "attack_eps": 4.0, "attack_step_size": 1.0, "attack_start": "random"}
MAX_PIXEL_BUDGET = 255.0


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str], dest: str) -> bool:
    """Whether an option of ``dest`` was typed in ``argv`` (as opposed to coming from a --config recipe)."""
    options = [o for action in parser._actions if action.dest == dest for o in action.option_strings]
    return any(arg == o or arg.startswith(o + "=") for arg in argv for o in options if o.startswith("--"))


def _dependent_options(parser: argparse.ArgumentParser, argv: Sequence[str], dests: Sequence[str], needs: str,
                       args: argparse.Namespace) -> None:
    """Options that only mean something with ``needs``, which is off: an error when typed on the command line,
    dropped (None) when they come from a recipe whose feature the command line switched off."""
    typed = [_flag(d) for d in dests if getattr(args, d) is not None and _on_command_line(parser, argv, d)]
    if typed:
        parser.error(f"{', '.join(typed)} without {needs}")
    for dest in dests:
        setattr(args, dest, None)


def _validate_recipe_options(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Optimizer, schedule, augmentation and adversarial options: combinations that cannot work, and the
    defaults of options that only mean something with another one."""
    try:
        check_optimizer_flags(args, typed=lambda dest: _on_command_line(parser, argv, dest))
    except ValueError as exc:
        parser.error(str(exc))
    if args.lr_schedule != "exponential":
        _dependent_options(parser, argv, ["lr_decay_epochs"], "--lr-schedule exponential", args)
    elif args.lr_decay_epochs is None:
        parser.error("--lr-schedule exponential needs --lr-decay-epochs E (multiply the lr by --lr-decay every E "
                     "epochs; EfficientNet: --lr-decay 0.97 --lr-decay-epochs 2.4)")
    if args.bn_momentum is not None and args.bn_momentum <= 0:
        parser.error("--bn-momentum must be > 0 (0 would freeze the running statistics at their initial values)")
    if args.drop_path is not None and args.arch is not None and not args.arch.startswith("efficientnet"):
        parser.error(f"--drop-path: --arch {args.arch} has no stochastic depth (efficientnet_* archs only)")
    if args.adv_train == "none":
        _dependent_options(parser, argv, ["adv_replays", "adv_eps", "adv_step_size"], "--adv-train free", args)
    else:
        for key, value in ADVERSARIAL_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.adv_step_size is None:
            args.adv_step_size = args.adv_eps
        if args.mixup > 0 and not args.evaluate:
            parser.error("--adv-train free and --mixup exclude each other (the perturbation belongs to the "
                         "images it was computed on, not to their mixtures)")
    if args.attack == "none":
        _dependent_options(parser, argv, list(ATTACK_DEFAULTS), "--attack pgd", args)
    else:
        if not args.evaluate:
            parser.error("--attack measures a trained model: it needs --evaluate (e.g. --evaluate "
                         "--pretrained-weights WORKSPACE/model_best.pth.tar --attack pgd)")
        for key, default in ATTACK_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
        args.attack_steps = sorted(set(args.attack_steps))
    for key in ("adv_eps", "adv_step_size", "attack_eps", "attack_step_size"):
        value = getattr(args, key)
        if value is not None and value > MAX_PIXEL_BUDGET:
            parser.error(f"{_flag(key)} is in 1/255 of the pixel range: at most {MAX_PIXEL_BUDGET:g}, got {value:g}")


def _validate_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    existing = nearest_existing_directory(args.workspace)
    if directory_write_problem(existing) is not None:
        parser.error(f"--workspace {args.workspace} is not writable ({existing} is not a writable directory)")
    for flag, path in (("--pretrained-weights", args.pretrained_weights), ("--resume", args.resume)):
        if path is not None and path != "auto" and os.path.isdir(path):
            parser.error(f"{flag} {path} is a directory, not a checkpoint file (e.g. "
                         f"{os.path.join(path, 'checkpoint.pth.tar')} or {os.path.join(path, 'model_best.pth.tar')})")
        if path is not None and path != "auto" and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such checkpoint file")
    name = args.checkpoint_filename
    if not name or os.path.basename(name) != name or name in (".", ".."):
        parser.error(f"--checkpoint-filename must be a plain file name (it is written in --workspace), got {name!r}")
    if name == "model_best.pth.tar":
        parser.error("--checkpoint-filename model_best.pth.tar is reserved for the best model")
    raport = args.raport_file if os.path.isabs(args.raport_file) else os.path.join(args.workspace, args.raport_file)
    if not args.raport_file or os.path.isdir(raport):
        parser.error(f"--raport-file {args.raport_file!r} is a directory, not a file name")
    existing = nearest_existing_directory(os.path.dirname(os.path.abspath(raport)))
    if directory_write_problem(existing) is not None:
        parser.error(f"--raport-file {args.raport_file}: cannot be created ({existing} is not a writable directory)")
    if args.tensorboard is not None:
        try:
            require_tensorboard()
        except ImportError as exc:
            parser.error(str(exc))
        logdir = os.path.join(args.workspace, args.tensorboard)
        if os.path.exists(logdir) and not os.path.isdir(logdir):
            parser.error(f"--tensorboard {args.tensorboard}: {logdir} is a file, not a directory")
        existing = nearest_existing_directory(logdir)
        problem = directory_write_problem(existing)
        if problem is not None:  # checked before anything is written (the raport, the workspace)
            parser.error(f"--tensorboard {args.tensorboard}: cannot create {logdir} ({existing}: {problem}); "
                         f"choose another folder")
        other = foreign_run(logdir, os.path.abspath(raport))
        if other is not None and not args.overwrite:
            parser.error(f"--tensorboard {args.tensorboard}: {logdir} holds the TensorBoard event files of {other}; "
                         f"choose another folder (e.g. one per run), or pass --overwrite to delete them")
    if args.dataset is None and args.resume is None and args.pretrained_weights is None:
        args.dataset = FALLBACK_DATASET  # no checkpoint can name one (build.infer_model_fields does it otherwise)
    if args.data is None and args.data_backend != "synthetic" and args.dataset == "imagenet":
        parser.error(f"DATA is required for --data-backend {args.data_backend} (the directory with train/ and val/)")


def _validate_compile(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    if not args.compile:
        if _on_command_line(parser, argv, "compile_backend"):
            parser.error(f"--compile-backend {args.compile_backend} without --compile (add --compile to compile "
                         "the model)")
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.compile_backend not in backends:
        parser.error(f"--compile-backend {args.compile_backend!r} is not a torch.compile backend; valid: "
                     f"{', '.join(backends)}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``--config`` support, then validate everything."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    if first.config is not None:
        parser.set_defaults(**load_config(parser, first.config))
    args = parser.parse_args(argv)
    _validate_names(parser, args)
    _validate_numbers(parser, args)
    _validate_recipe_options(parser, args, argv)
    _validate_paths(parser, args)
    _validate_compile(parser, args, argv)
    if args.trust_checkpoints and os.environ.get("RANK", "0") == "0":  # said once, by rank 0, before any load
        print(f"main.py: {TRUST_WARNING}", file=sys.stderr, flush=True)
    return args

