"""Dynamic convolution operators: PEDConv and its peers, each a drop-in for nn.Conv2d.

Build one from a spec string with :func:`build_conv` or convert a static conv with
:func:`conv_from_static`; :func:`list_operators` names them all.

The package has three parts: the operator contract at its root (:mod:`.registry`, :mod:`.protocol`,
:mod:`.base`, :mod:`.functional`, :mod:`.static`, :mod:`.autotune`), the PEDConv family in :mod:`.pedconv`
and the operators it is compared with in :mod:`.peers`.

Adding an operator is one module in :mod:`.peers` plus its import line in ``peers/__init__.py``: a
:class:`DynamicConv2d` subclass registered with :func:`register_operator`, whose hooks (:mod:`.protocol`: MACs,
BatchNorm gamma, placement, dynamic classifier, foreign checkpoint layouts) tell the rest of the project all it
needs.
"""

from .base import DynamicConv2d, dynamic_modules, infomax_loss, set_epoch
from .protocol import ForeignLayout, LinearAsConv, OperatorProtocol
from .registry import (
    OPERATORS,
    ConvSpec,
    Option,
    build_conv,
    conv_from_static,
    find_foreign_layout,
    implied_spec,
    list_operators,
    operator_class,
    parse_spec,
    register_operator,
    unregister_operator,
)
from .static import StaticConv2d

# Operator modules register themselves on import: the PEDConv family, then its peers.
from . import pedconv  # noqa: E402,F401  isort: skip
from . import peers  # noqa: E402,F401  isort: skip

# PEDConv's execution-path reports (the autotuner serves its ``path=auto`` layers)
from .pedconv import auto_path_layers, format_path_report, has_auto_paths, path_report, reset_path_report  # noqa: E402  isort: skip

__all__ = [
    "OPERATORS",
    "ConvSpec",
    "DynamicConv2d",
    "ForeignLayout",
    "LinearAsConv",
    "OperatorProtocol",
    "Option",
    "StaticConv2d",
    "build_conv",
    "conv_from_static",
    "dynamic_modules",
    "find_foreign_layout",
    "format_path_report",
    "has_auto_paths",
    "auto_path_layers",
    "implied_spec",
    "infomax_loss",
    "list_operators",
    "operator_class",
    "parse_spec",
    "path_report",
    "register_operator",
    "reset_path_report",
    "set_epoch",
    "unregister_operator",
]
