"""The authors' released PEDConv checkpoint layout (``P.attn.fc_share``, ``fc_inp``, ``fc_oup``, ``fc_k``,
``decoder``) and its conversion to this project's (``generator.fc_share``, ``generator.heads.0.fc_{phi,gamma,psi}``,
``infomax_decoder``), with the rank-major reordering of rank-R heads. :data:`AUTHORS_LAYOUT` is the
:class:`..protocol.ForeignLayout` that :class:`.layer.PEDConv2d` declares, so checkpoints in that layout load
wherever a checkpoint loads.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import Tensor

from ..protocol import ForeignLayout
from .common import COMPONENTS

__all__ = ["AUTHORS_LAYOUT", "AUTHORS_MARKER", "convert_authors_state_dict"]


#: a key fragment only the authors' PEDConv layout has
AUTHORS_MARKER = ".attn.fc_share."
_AUTHORS_KEYS = (
    (re.compile(r"(^|\.)attn\.fc_share\."), r"\1generator.fc_share."),
    (re.compile(r"(^|\.)attn\.fc_inp\."), r"\1generator.heads.0.fc_phi."),
    (re.compile(r"(^|\.)attn\.fc_oup\."), r"\1generator.heads.0.fc_gamma."),
    (re.compile(r"(^|\.)attn\.fc_k\."), r"\1generator.heads.0.fc_psi."),
    (re.compile(r"(^|\.)attn\.decoder\."), r"\1infomax_decoder."),
)


#: a converted head's key; group 1 is the layer's module path, absent for a bare layer's state dict
_HEAD_KEY = re.compile(r"^(?:(.*)\.)?generator\.heads\.0\.fc_")


def _member(layer: str, name: str) -> str:
    """``layer.name``, or ``name`` for a bare layer (``layer`` empty)."""
    return f"{layer}.{name}" if layer else name


def _authors_rank(converted: Mapping[str, Any], layer: str) -> Tuple[int, Dict[str, int]]:
    """Rank R and component lengths of one converted authors' layer, from its heads and base weight."""
    base = converted.get(_member(layer, "weight"))
    if not isinstance(base, Tensor) or base.dim() != 4:
        raise ValueError(f"convert_authors_state_dict: cannot infer the rank of {layer or 'the layer'}: "
                         f"its base weight {_member(layer, 'weight')} is missing")
    cout, cin_g, kh, kw = base.shape
    dims = {"phi": cin_g, "gamma": cout, "psi": kh * kw}
    rows = {name: converted[_member(layer, f"generator.heads.0.fc_{name}.weight")].shape[0]
            for name in COMPONENTS if _member(layer, f"generator.heads.0.fc_{name}.weight") in converted}
    ranks = {name: n // dims[name] for name, n in rows.items() if n % dims[name] == 0}
    if len(ranks) != len(rows) or len(set(ranks.values())) != 1 or 0 in ranks.values():
        found = ", ".join(f"fc_{name} {n} rows" for name, n in rows.items())
        raise ValueError(f"convert_authors_state_dict: {layer or 'the layer'}: heads ({found}) are no common rank R of "
                         f"C_in/g={cin_g}, C_out={cout}, k*k={kh * kw}")
    return next(iter(ranks.values())), {name: dims[name] for name in rows}


def _rank_major(t: Tensor, dim: int, rank: int, axis: int) -> Tensor:
    """Reorder ``axis`` of ``t`` from the authors' (dim, R) order to PEDConv2d's (R, dim) order."""
    moved = t.movedim(axis, 0)
    out = moved.reshape(dim, rank, *moved.shape[1:]).transpose(0, 1).reshape(moved.shape)
    return out.movedim(0, axis).contiguous()


def convert_authors_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Map a state dict of the authors' PEDConv release onto :class:`PEDConv2d` names.

    Accepts the checkpoint dict itself (a ``'state_dict'`` entry is unwrapped). Strips a ``module.``
    prefix from every key; renames ``P.attn.fc_share``/``fc_inp`` (phi)/``fc_oup`` (gamma)/``fc_k`` (psi)
    to ``P.generator.fc_share``/``P.generator.heads.0.fc_{phi,gamma,psi}`` and ``P.attn.decoder.{0,2}``
    to ``P.infomax_decoder.{0,2}``. The decoder input order is the same as the authors'
    ([phi; gamma; psi], pre-sigmoid). Other keys (``P.weight``, BatchNorm, fc, ...) are kept unchanged.

    Rank R (the authors' ``Attn4d_CP`` with ``r > 1``): their heads output ``dim * R`` values read as
    ``view(B, dim, R)`` (row ``d * R + r``), where :class:`PEDConv2d` reads ``view(B, R, dim)`` (row
    ``r * dim + d``). R is inferred per layer from the head sizes and the base weight ``P.weight``;
    rows of the heads (weights and biases) and the matching columns of the decoder's first layer are
    reordered. A layer whose heads are no common multiple of its component lengths, or whose base
    weight is missing, or whose decoder input width is not ``R (C_in/g + C_out + k*k)``, raises
    ValueError naming the layer: nothing is loaded silently wrong.
    """
    inner = state_dict.get("state_dict") if isinstance(state_dict.get("state_dict"), Mapping) else None
    source = inner if inner is not None else state_dict
    converted: Dict[str, Any] = {}
    for key, value in source.items():
        name = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in _AUTHORS_KEYS:
            name = pattern.sub(repl, name)
        converted[name] = value
    layers = sorted({m.group(1) or "" for m in map(_HEAD_KEY.match, converted) if m is not None})
    for layer in layers:
        rank, dims = _authors_rank(converted, layer)
        if rank == 1:
            continue
        for name, dim in dims.items():
            for field in ("weight", "bias"):
                key = _member(layer, f"generator.heads.0.fc_{name}.{field}")
                if key in converted:
                    converted[key] = _rank_major(converted[key], dim, rank, 0)
        key = _member(layer, "infomax_decoder.0.weight")
        if key in converted:
            decoder = converted[key]
            width = rank * sum(dims.values())
            if decoder.dim() != 2 or decoder.shape[1] != width:
                raise ValueError(f"convert_authors_state_dict: {key} reads {decoder.shape[-1]} inputs, rank {rank} "
                                 f"heads give {width}")
            pieces, start = [], 0
            for name in COMPONENTS:
                if name in dims:
                    size = rank * dims[name]
                    pieces.append(_rank_major(decoder[:, start:start + size], dims[name], rank, 1))
                    start += size
            converted[key] = torch.cat(pieces, 1)
    return converted


def _is_authors_layout(state_dict: Mapping[str, Any]) -> bool:
    inner = state_dict.get("state_dict")
    keys = inner if isinstance(inner, Mapping) else state_dict
    # a model's keys hold ".attn.fc_share."; a bare layer's start with "attn.fc_share."
    return any(AUTHORS_MARKER in str(key) or str(key).startswith(AUTHORS_MARKER[1:]) for key in keys)


#: the authors' PEDConv release (``P.attn.fc_share`` ...), loaded through :func:`convert_authors_state_dict`
AUTHORS_LAYOUT = ForeignLayout(
    description="the authors' PEDConv layout",
    detect=_is_authors_layout,
    convert=convert_authors_state_dict,
    accepts=lambda spec: spec.name == "pedconv",
    mismatch="{label} is in the authors' PEDConv layout (operator pedconv), model is operator {conv}",
    implied_spec="pedconv",  # the authors' README evaluates their checkpoints without naming the operator
)

