"""Dynamic convolution operators: PEDConv and its peers, each a drop-in for nn.Conv2d.

Build one from a spec string with :func:`build_conv` or convert a static conv with
:func:`conv_from_static`; :func:`list_operators` names them all.
"""

from .base import DynamicConv2d, dynamic_modules, infomax_loss, set_epoch
from .registry import (
    OPERATORS,
    ConvSpec,
    Option,
    build_conv,
    conv_from_static,
    list_operators,
    parse_spec,
    register_operator,
)
from .static import StaticConv2d

# Operator modules register themselves on import.
from . import pedconv  # noqa: E402,F401  isort: skip
from . import spatial  # noqa: E402,F401  isort: skip
from . import dcd  # noqa: E402,F401  isort: skip
from . import dyconv  # noqa: E402,F401  isort: skip
from . import condconv  # noqa: E402,F401  isort: skip
from . import involution  # noqa: E402,F401  isort: skip
from . import odconv  # noqa: E402,F401  isort: skip

__all__ = [
    "OPERATORS",
    "ConvSpec",
    "DynamicConv2d",
    "Option",
    "StaticConv2d",
    "build_conv",
    "conv_from_static",
    "dynamic_modules",
    "infomax_loss",
    "list_operators",
    "parse_spec",
    "register_operator",
    "set_epoch",
]
