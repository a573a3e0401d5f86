"""Applying checkpoint weights to a model: field and key checks, wrapper prefixes, foreign layouts.

:func:`load_model_weights` loads this project's checkpoints, raw state dicts, EMA (``AveragedModel``)
states and the authors' released layouts (PEDConv's, DCD's), after checking the checkpoint's
``arch``/``conv`` fields and every key and shape against the model, so a refused file leaves the model
unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn as nn

from image_classification.dynamic.protocol import ForeignLayout
from image_classification.dynamic.registry import find_foreign_layout, parse_spec

from .errors import CheckpointError, PathLike, one_line
from .load import MAX_LISTED, load_checkpoint, looks_like_state_dict

__all__ = ["load_model_weights", "check_model_fields", "recorded_arch", "recorded_args"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _canonical_conv(spec: Optional[str]) -> Optional[str]:
    if spec is None:
        return None
    text = str(spec).strip()
    try:
        return str(parse_spec(text))
    except ValueError:  # not a spec of a registered operator: compare the text as written
        return text


def _accepts(layout: ForeignLayout, conv: str) -> bool:
    """Whether a model of operator ``conv`` takes weights converted from ``layout`` (unparsable: no)."""
    try:
        return bool(layout.accepts(parse_spec(conv)))
    except ValueError:
        return False


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict has no wrapper prefixes (DDP/DataParallel, compile, AveragedModel)."""
    from torch.optim.swa_utils import AveragedModel

    wrappers: Tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel, AveragedModel)
    while True:
        if isinstance(model, wrappers):
            model = cast(nn.Module, model.module)
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(state_dict: Mapping[str, Any], model_keys: Sequence[str]) -> Dict[str, Any]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes shared by every key, and AveragedModel's counter."""
    sd = dict(state_dict)
    while sd:
        if "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged"):
            if "n_averaged" not in model_keys:
                sd.pop("n_averaged")
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None or (model_keys and all(k.startswith(prefix) for k in model_keys)):
            return sd
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _listing(kind: str, items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f", ... {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {kind} ({shown}{more})"


def _check_keys(label: str, state_dict: Mapping[str, Any], target: nn.Module, strict: bool) -> None:
    expected = target.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched, names = [], []
    for key, value in state_dict.items():
        if key in expected and isinstance(value, torch.Tensor) and isinstance(expected[key], torch.Tensor):
            if value.shape != expected[key].shape:
                mismatched.append(f"{key}: checkpoint {list(value.shape)} vs model {list(expected[key].shape)}")
                names.append(key)
    problems = []
    if strict and missing:
        problems.append(_listing("missing", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise CheckpointError(f"{label}: state_dict does not match the model: " + "; ".join(problems)
                              + _remedy(target, state_dict, names))


def _remedy(target: nn.Module, state_dict: Mapping[str, Any], mismatched: Sequence[str]) -> str:
    """What to change when shapes differ: the class count when only the classifier differs, else the model flags."""
    if not mismatched:
        return ""
    classifier = [name for name, m in target.named_modules() if isinstance(m, nn.Linear)][-1:]
    head = {f"{name}.weight" for name in classifier} | {f"{name}.bias" for name in classifier}
    if set(mismatched) <= head:
        classes = state_dict[f"{classifier[0]}.weight"].shape[0] if f"{classifier[0]}.weight" in state_dict else None
        if classes is not None:
            return f" (the checkpoint classifies {classes} classes: give --num-classes {classes})"
    return (" (the checkpoint's layers have other shapes: check --arch, --conv and --placement, or leave them out to "
            "take what the checkpoint records)")


def recorded_args(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The command-line arguments a checkpoint recorded (its ``args`` field), or {} where it has none (a raw
    state dict, another code base's release)."""
    found = checkpoint.get("args")
    return found if isinstance(found, dict) else {}


def recorded_arch(checkpoint: Mapping[str, Any]) -> Optional[str]:
    """The architecture a checkpoint records in this project's naming, or None (no field, or another code
    base's own arch name such as the DCD release's ``resnet50_dcd``)."""
    found = checkpoint.get("arch")
    if found is None:
        return None
    state = checkpoint.get("state_dict")
    layout = find_foreign_layout(state) if isinstance(state, Mapping) else None
    if layout is not None and layout.foreign_arch(str(found)):
        return None
    return str(found).strip()


def check_model_fields(checkpoint: Mapping[str, Any], expected_arch: Optional[str] = None,
                       expected_conv: Optional[str] = None, label: str = "checkpoint") -> None:
    """:class:`CheckpointError` naming both sides when the checkpoint's ``arch``/``conv`` fields contradict the
    expected ones (either side missing: nothing to compare). Cheap: no model needed, so callers check before
    they build anything."""
    found_arch = recorded_arch(checkpoint)
    found_conv = checkpoint.get("conv")
    arch_differs = expected_arch is not None and found_arch is not None and found_arch != str(expected_arch).strip()
    conv_differs = (
        expected_conv is not None
        and found_conv is not None
        and _canonical_conv(found_conv) != _canonical_conv(expected_conv)
    )
    if arch_differs or conv_differs:
        fields = ", ".join(name for name, bad in (("arch", arch_differs), ("conv", conv_differs)) if bad)
        raise CheckpointError(
            f"{label} is for arch {found_arch} / operator {found_conv if found_conv is not None else '?'}, "
            f"model is arch {expected_arch if expected_arch is not None else found_arch} / operator "
            f"{expected_conv if expected_conv is not None else found_conv} (mismatching: {fields})"
        )


def load_model_weights(
    model: nn.Module,
    source: Union[PathLike, Mapping[str, Any]],
    expected_arch: Optional[str] = None,
    expected_conv: Optional[str] = None,
    strict: bool = True,
) -> Dict[str, Any]:
    """Load weights from ``source`` (a file or an already loaded dict) into ``model``; return the checkpoint.

    Accepted: this project's checkpoints (``arch``/``conv`` fields checked against
    ``expected_arch``/``expected_conv`` when both sides give them), raw state dicts,
    ``AveragedModel`` (EMA) states, state dicts with ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) prefixes, and the state-dict layouts of other code bases that the operators
    declare (``foreign_layouts``: the authors' PEDConv release, the DCD release), detected and
    converted by the operator's :class:`~image_classification.dynamic.protocol.ForeignLayout`. A
    DDP/DataParallel/compiled/AveragedModel ``model`` is loaded through its inner module. Keys and shapes
    are checked before anything is copied, so on a :class:`CheckpointError` (listing up to five offending
    keys per kind, with counts) the model is unchanged. ``strict=False`` tolerates missing/unexpected keys
    but never shape mismatches.
    """
    if isinstance(source, Mapping):
        label = "checkpoint"
        checkpoint: Dict[str, Any] = dict(source)
        if not isinstance(checkpoint.get("state_dict"), Mapping):
            if isinstance(checkpoint.get("model"), Mapping) and looks_like_state_dict(checkpoint["model"]):
                checkpoint["state_dict"] = checkpoint["model"]
            elif looks_like_state_dict(checkpoint):
                checkpoint = {"state_dict": checkpoint}
            else:
                raise CheckpointError("checkpoint dict has no 'state_dict' and is not a state dict itself")
    else:
        label = f"checkpoint {Path(source).expanduser()}"
        checkpoint = load_checkpoint(source)

    check_model_fields(checkpoint, expected_arch, expected_conv, label)

    target = _unwrap(model)
    model_keys = list(target.state_dict().keys())
    state_dict = _strip_prefixes(checkpoint["state_dict"], model_keys)

    layout = find_foreign_layout(state_dict)  # the operators' foreign layouts (the authors' releases)
    if layout is not None:
        if expected_conv is not None and not _accepts(layout, expected_conv):
            raise CheckpointError(layout.mismatch.format(label=label, conv=expected_conv))
        try:
            state_dict = dict(layout.convert(state_dict))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{label}: cannot convert {layout.description}: {one_line(exc)}") from None

    _check_keys(label, state_dict, target, strict)
    try:
        target.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:  # e.g. a dtype a buffer cannot take; keys and shapes were checked above
        raise CheckpointError(f"{label}: {one_line(exc)}") from None
    return checkpoint
