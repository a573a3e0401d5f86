"""Command line of ``main.py``: DeepLearningExamples' flag names, YAML recipes, up-front validation.

``parse_args`` reads ``--config FILE.yaml`` first (keys are long flag names, with dashes or underscores),
installs its values as parser defaults and parses the command line again, so explicit flags win over the
recipe. Everything that can be checked before touching data or disk is checked here and reported like an
argparse error: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

from .distributed import env_world_size

__all__ = ["build_parser", "parse_args", "load_config", "resolve_conv", "DEFAULT_DYNAMIC_SPEC"]

DEFAULT_DYNAMIC_SPEC = "pedconv"
DATA_BACKENDS = ("pytorch", "dali-cpu", "dali-gpu", "synthetic")
DATASETS = ("imagenet", "fashion-mnist", "cifar10")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "data", metavar="DATA", nargs="?", default=None,
        help="dataset directory: ImageNet layout DATA/train/<class>/*, DATA/val/<class>/* for imagenet; the "
        "IDX .gz directory for fashion-mnist (default /usr/share/datasets/fashion-mnist); the CIFAR-10 python "
        "batches for cifar10; unused by --data-backend synthetic",
    )
    group.add_argument("--data-backend", default="pytorch", choices=DATA_BACKENDS, help="data loader (default: pytorch)")
    group.add_argument("--dataset", default="imagenet", choices=DATASETS, help="dataset layout (default: imagenet)")
    group.add_argument("--image-size", type=_positive_int, default=None,
                       help="train/val crop size (default: 224 imagenet, 28 fashion-mnist, 32 cifar10)")
    group.add_argument("--num-classes", type=_positive_int, default=None,
                       help="classifier outputs (default: the number of classes in the data)")
    group.add_argument("-j", "--workers", type=int, default=5, metavar="N", help="data loading workers (default: 5)")
    group.add_argument("-b", "--batch-size", type=_positive_int, default=256, metavar="N",
                       help="mini-batch size per process (default: 256)")
    group.add_argument("--val-batch-size", type=_positive_int, default=None, metavar="N",
                       help="validation batch size per process (default: --batch-size)")
    group.add_argument("--train-subset", type=_positive_int, default=None, metavar="N",
                       help="train on a seeded random subset of N images (default: all)")
    group.add_argument("--val-subset", type=_positive_int, default=None, metavar="N",
                       help="validate on a seeded random subset of N images (default: all)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--arch", "-a", default="resnet50", metavar="ARCH", help="architecture (default: resnet50)")
    group.add_argument("--conv", default=None, metavar="SPEC",
                       help="convolution operator spec, e.g. static, pedconv, pedconv:rank=4, dcd, dyconv:k=4, "
                       "condconv:k=8, involution (default: static, or the operator stored in the checkpoint "
                       "given to --resume/--pretrained-weights)")
    group.add_argument("--dynamic", action="store_true",
                       help=f"use the paper's dynamic convolution: same as --conv {DEFAULT_DYNAMIC_SPEC}")
    group.add_argument("--placement", default="paper",
                       help="which convolutions become dynamic (default: paper = all but the stem, the 1x1 "
                       "shortcuts and the classifier)")
    group.add_argument("-c", "--model-config", default="classic", choices=("classic", "fanin", "fanout"),
                       help="weight initialisation (default: classic)")
    group.add_argument("--dropout", type=_probability, default=None, metavar="P",
                       help="dropout before the classifier (default: the arch's own, e.g. 0.2 for MobileNetV2, "
                       "none for ResNets)")
    group.add_argument("--infomax-weight", type=_non_negative_float, default=1e-3, metavar="LAMBDA",
                       help="weight of the PEDConv info-max loss (default: 1e-3)")
    group.add_argument("--memory-format", default="nchw", choices=("nchw", "nhwc"),
                       help="memory layout; nhwc = channels_last (default: nchw)")


def _add_optim_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--optimizer-batch-size", type=int, default=-1, metavar="N",
                       help="global batch per optimizer step; a multiple of batch size x processes, reached by "
                       "gradient accumulation (default: batch size x processes)")
    group.add_argument("--lr", type=_non_negative_float, default=0.1, help="peak learning rate (default: 0.1)")
    group.add_argument("--warmup", type=int, default=0, metavar="E", help="linear warmup epochs (default: 0)")
    group.add_argument("--lr-schedule", default="step", choices=("step", "linear", "cosine"),
                       help="decay after warmup (default: step)")
    group.add_argument("--lr-steps", type=int, nargs="+", default=[30, 60, 80], metavar="E",
                       help="epochs where the step schedule multiplies the lr by --lr-decay (default: 30 60 80)")
    group.add_argument("--lr-decay", type=float, default=0.1, help="step schedule factor (default: 0.1)")
    group.add_argument("--end-lr", type=_non_negative_float, default=0.0, help="final lr of linear/cosine (default: 0)")
    group.add_argument("--mom", "--momentum", dest="momentum", type=_non_negative_float, default=0.9,
                       help="SGD momentum (default: 0.9)")
    group.add_argument("--wd", "--weight-decay", dest="weight_decay", type=_non_negative_float, default=1e-4,
                       help="weight decay (default: 1e-4)")
    group.add_argument("--bn-weight-decay", action="store_true",
                       help="also decay BatchNorm and bias parameters (default: they are excluded)")
    group.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    group.add_argument("--label-smoothing", type=float, default=0.0, metavar="S", help="label smoothing (default: 0)")
    group.add_argument("--mixup", type=_non_negative_float, default=0.0, metavar="ALPHA",
                       help="mixup Beta(alpha, alpha); 0 disables (default: 0)")
    group.add_argument("--epochs", type=_positive_int, default=90, help="epochs of the schedule (default: 90)")
    group.add_argument("--run-epochs", type=int, default=-1, metavar="N",
                       help="run only N epochs in this invocation (schedules spanning several jobs; default: all)")
    group.add_argument("--use-ema", type=float, nargs="?", const=0.9999, default=None, metavar="DECAY",
                       help="keep and validate an exponential moving average of the weights (decay, default 0.9999)")


def _add_precision_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision and hardware")
    group.add_argument("--amp", action="store_true", help="automatic mixed precision (torch.amp)")
    group.add_argument("--amp-dtype", default="fp16", choices=("fp16", "bf16"),
                       help="autocast dtype; fp16 uses a gradient scaler (default: fp16)")
    group.add_argument("--static-loss-scale", type=float, default=None, metavar="S",
                       help="fixed fp16 loss scale (default: dynamic scaling)")
    group.add_argument("--dynamic-loss-scale", action="store_true",
                       help="dynamic fp16 loss scaling starting at --static-loss-scale (the default without it)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="compute device (default: cuda when available)")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed (default: random, shared by all processes and recorded in the raport)")
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
    group.add_argument("-p", "--print-freq", type=_positive_int, default=10, metavar="N",
                       help="log every N iterations (default: 10)")
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
                       help="also keep per-epoch copies: the last N (no value: all)")
    group.add_argument("--prof", type=int, default=-1, metavar="N",
                       help="stop each epoch after N iterations (smoke and throughput runs)")


def build_parser() -> argparse.ArgumentParser:
    """The complete ``main.py`` parser (DeepLearningExamples names plus the dynamic-conv options)."""
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Train or evaluate an image classifier with static or dynamic convolutions "
        "(PEDConv, DCD, DY-Conv, CondConv, Involution). Single process, or DDP under torchrun/multiproc.py.",
    )
    _add_data_flags(parser)
    _add_model_flags(parser)
    _add_optim_flags(parser)
    _add_precision_flags(parser)
    _add_run_flags(parser)
    return parser


def _long_names(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Config key (dashes and underscores both) -> action, for every long flag and DATA."""
    names: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in ("help", "config"):
            continue
        keys = [opt[2:] for opt in action.option_strings if opt.startswith("--")]
        if not action.option_strings:
            keys = [action.dest]
        for key in keys:
            names[key] = action
            names[key.replace("-", "_")] = action
    return names


def _check_config_value(parser: argparse.ArgumentParser, key: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(value, bool) and action.nargs == "?" and action.const is not None:
        return action.const if value else action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            parser.error(f"config key {key!r} must be true or false, got {value!r}")
        return (not value) if isinstance(action, argparse._StoreFalseAction) else value
    if action.nargs in ("+", "*") and not isinstance(value, list):
        value = [value]
    if isinstance(value, list) and action.type is not None:
        try:
            value = [action.type(str(v)) for v in value]
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"config key {key!r}: {exc}")
    elif value is not None and action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(str(value))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"config key {key!r}: invalid value {value!r} ({exc})")
    if action.choices is not None and value is not None and value not in action.choices:
        parser.error(f"config key {key!r}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


def load_config(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """Read a YAML recipe into ``{dest: value}``; unknown keys and bad values end in ``parser.error``."""
    import yaml

    try:
        with open(path) as handle:
            content = yaml.safe_load(handle)
    except OSError as exc:
        parser.error(f"cannot read --config {path}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        parser.error(f"--config {path} is not valid YAML: {' '.join(str(exc).split())}")
    if content is None:
        return {}
    if not isinstance(content, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values")
    names = _long_names(parser)
    unknown = sorted(str(key) for key in content if str(key) not in names)
    if unknown:
        parser.error(f"unknown key(s) in --config {path}: {', '.join(unknown)}")
    return {names[key].dest: _check_config_value(parser, key, names[key], value) for key, value in content.items()}


def resolve_conv(args: argparse.Namespace) -> Optional[str]:
    """The operator spec requested on the command line (``--dynamic`` = pedconv), or None if unspecified."""
    if args.dynamic:
        if args.conv is not None and not args.conv.strip().lower().startswith(DEFAULT_DYNAMIC_SPEC):
            raise ValueError(f"--dynamic means --conv {DEFAULT_DYNAMIC_SPEC} and conflicts with --conv {args.conv}")
        return args.conv or DEFAULT_DYNAMIC_SPEC
    return args.conv


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _validate_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from image_classification.dynamic import parse_spec
    from image_classification.models import list_archs

    archs = list(list_archs())
    if args.arch not in archs:
        parser.error(f"unknown --arch {args.arch!r}; valid: {', '.join(archs)}")
    try:
        spec = resolve_conv(args)
        if spec is not None:
            args.conv = str(parse_spec(spec))
    except ValueError as exc:
        parser.error(f"--conv: {exc}")


def _validate_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    world = env_world_size()
    step_batch = args.batch_size * world
    if args.optimizer_batch_size == -1:
        args.optimizer_batch_size = step_batch
    if args.optimizer_batch_size < 1 or args.optimizer_batch_size % step_batch:
        parser.error(
            f"--optimizer-batch-size {args.optimizer_batch_size} is not a multiple of batch size x processes "
            f"({args.batch_size} x {world} = {step_batch})"
        )
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.use_ema is not None and not 0.0 < args.use_ema < 1.0:
        parser.error(f"--use-ema decay must be in (0, 1), got {args.use_ema}")
    if args.workers < 0:
        parser.error(f"-j/--workers must be >= 0, got {args.workers}")
    if args.warmup < 0 or args.warmup > args.epochs:
        parser.error(f"--warmup must be between 0 and --epochs ({args.epochs}), got {args.warmup}")
    if args.static_loss_scale is not None and args.static_loss_scale <= 0:
        parser.error(f"--static-loss-scale must be > 0, got {args.static_loss_scale}")
    if args.nesterov and args.momentum <= 0:
        parser.error("--nesterov needs a positive --mom")
    if args.evaluate and args.training_only:
        parser.error("--evaluate and --training-only exclude each other")


def _validate_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    existing = _nearest_existing(args.workspace)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--workspace {args.workspace} is not writable ({existing} is not a writable directory)")
    for flag, path in (("--pretrained-weights", args.pretrained_weights), ("--resume", args.resume)):
        if path is not None and path != "auto" and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such checkpoint file")
    if args.data is None and args.data_backend != "synthetic" and args.dataset == "imagenet":
        parser.error(f"DATA is required for --data-backend {args.data_backend} (the directory with train/ and val/)")


def _validate_compile(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not getattr(args, "compile", False):
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
    _validate_paths(parser, args)
    _validate_compile(parser, args)
    return args

