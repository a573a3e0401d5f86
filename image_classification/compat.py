"""What differs between the torch releases this project supports, in one place.

The supported range is ``torch >= MIN_TORCH`` (pyproject.toml's dependency; CI runs the whole suite on the
pinned torch of requirements.txt and on the oldest one of requirements-oldest.txt). Code that must behave
differently on an older torch asks a *feature* question here (does dynamo trace this, does the exporter
honour that), never a version string, so each answer says why it exists and can go when the range moves.

This module sits in the library's bottom layer: it imports nothing of the project.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any, Callable, List, Optional, Tuple

import torch

__all__ = [
    "MIN_TORCH",
    "MIN_TORCHVISION",
    "torch_version_tuple",
    "check_torch_version",
    "custom_op",
    "dynamo_onnx_exporter_is_default",
    "is_compiler_error",
    "uncompile",
    "OUT_OF_MEMORY_ERRORS",
    "addmm_relu",
    "any_autocast_enabled",
    "cudnn_conv_allows_tf32",
    "unsafe_globals_in_checkpoint",
]

#: the oldest torch (and its torchvision) the project supports: NGC's pytorch:24.12-py3 container ships 2.6
MIN_TORCH: Tuple[int, int] = (2, 6)
MIN_TORCHVISION: Tuple[int, int] = (0, 21)


def torch_version_tuple(version: Optional[str] = None) -> Tuple[int, int]:
    """``(major, minor)`` of a torch version string (the installed torch's by default): ``"2.6.0+cu124"`` -> (2, 6);
    NVIDIA's container builds (``"2.6.0a0+ecf3bae40a.nv25.01"``) count as their release."""
    match = re.search(r"(\d+)\.(\d+)", version if version is not None else torch.__version__)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: Optional[str] = None) -> None:
    """Raise ImportError, in one line naming the installed and the required version, on a torch older than
    :data:`MIN_TORCH` (the package's ``__init__`` calls it, so the failure comes before any other)."""
    installed = version if version is not None else torch.__version__
    need = ".".join(map(str, MIN_TORCH))
    try:
        found = torch_version_tuple(installed)
    except ValueError:
        raise ImportError(f"image_classification cannot read the installed torch's version ({installed!r}); it needs "
                          f"torch >= {need}: reinstall torch (pip install 'torch>={need}')") from None
    if found < MIN_TORCH:
        raise ImportError(f"image_classification needs torch >= {need}, but torch {installed} is installed; "
                          f"upgrade it (pip install 'torch>={need}') or use an NGC pytorch:24.12-py3 or newer image")


def custom_op(name: str, fn: Callable[..., Any], *, mutates_args: Tuple[str, ...] = ()) -> Any:
    """``torch.library.custom_op(name, mutates_args=...)(fn)`` for a function whose annotations are strings
    (``from __future__ import annotations``).

    torch 2.6's schema inference evaluates string annotations in its own namespace, where ``Tuple`` and the
    function's imports do not exist (``NameError``); later releases resolve them. Resolving them here with
    :func:`typing.get_type_hints` (in ``fn``'s own module) works on every release.
    """
    fn.__annotations__ = typing.get_type_hints(fn)
    return torch.library.custom_op(name, mutates_args=mutates_args)(fn)


def dynamo_onnx_exporter_is_default() -> bool:
    """Whether ``torch.onnx.export`` exports through ``torch.export`` (``dynamo=True``) unless told otherwise.

    Releases that still default to the TorchScript exporter (torch 2.6) carry a dynamo exporter that cannot yet
    convert every model (e.g. CondConv's, DCD's and Involution's ``ConversionError``); ``export --exporter auto``
    takes the dynamo exporter only where torch itself does."""
    parameter = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    return parameter is not None and parameter.default is True


def is_compiler_error(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.compile failing to trace or to compile (a dynamo or backend error), as opposed to
    an error of the model itself, which eager execution would raise too."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def uncompile(module: torch.nn.Module) -> None:
    """Undo ``module.compile()`` (``nn.Module.compile`` keeps the compiled callable in ``_compiled_call_impl``;
    clearing it makes the module call its eager forward again). A module that was never compiled is left as it is."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        module._compiled_call_impl = None


#: the exception types torch raises for an allocation it cannot serve (``torch.OutOfMemoryError`` since 2.5; before,
#: only ``torch.cuda.OutOfMemoryError``, a RuntimeError whose text says "out of memory", as the CPU's says "can't
#: allocate memory")
OUT_OF_MEMORY_ERRORS: Tuple[type, ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    if isinstance(t, type))

# private ops whose public spelling differs between releases; each has a plain fallback
_IS_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)
_ADDMM_ACTIVATION = getattr(torch, "_addmm_activation", None)  # torch >= 1.13: addmm with a ReLU epilogue


def any_autocast_enabled() -> bool:
    """Whether autocast is on for any device, in one call where torch has one (every supported release)."""
    if _IS_ANY_AUTOCAST is not None:
        return bool(_IS_ANY_AUTOCAST())
    return torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")  # pragma: no cover - older torch


def addmm_relu(bias: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, alpha: float) -> torch.Tensor:
    """``relu(bias + alpha * mat1 @ mat2)``: one call where torch has the fused ``_addmm_activation``."""
    if _ADDMM_ACTIVATION is not None:
        return _ADDMM_ACTIVATION(bias, mat1, mat2, alpha=alpha)
    return torch.addmm(bias, mat1, mat2, alpha=alpha).relu_()  # pragma: no cover - every torch >= 2.0 has it


def cudnn_conv_allows_tf32() -> bool:
    """cuDNN's float32 convolution precision setting: ``torch.backends.cudnn.conv.fp32_precision`` on releases
    that have it (``"tf32"`` / ``"ieee"``), else ``torch.backends.cudnn.allow_tf32``."""
    precision = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def unsafe_globals_in_checkpoint(path: str) -> Optional[List[str]]:
    """The globals a checkpoint file references beyond ``torch.load(weights_only=True)``'s allowlist, or None where
    torch cannot tell (``torch.serialization.get_unsafe_globals_in_checkpoint`` exists since 2.5). Errors reading
    the file propagate."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    return None if finder is None else list(finder(path))
