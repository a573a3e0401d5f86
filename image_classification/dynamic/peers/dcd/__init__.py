"""DCD: dynamic convolution decomposition (Li et al., ICLR 2021, Eq. 6-9), and its dynamic classifier.

``W(x) = Lambda(x) W0 + P Phi(x) Q^T``: a diagonal attention Lambda on the static weight plus a low-rank dynamic
residual. :mod:`.conv` holds the operator (``dcd``), :mod:`.linear` the classifier, :mod:`.sizes` the paper's and
the release's size rules, :mod:`.released` the authors' checkpoint layout. docs/operators.md ("DCD: forms, sizes
and execution") describes the forms, the release's differences and the execution paths; docs/counts.md the
parameter counts.
"""

from .common import VARIANTS
from .conv import PATHS, DCDConv2d
from .linear import DCDLinear
from .released import RELEASED_LAYOUT, convert_released_state_dict, is_released_state_dict
from .sizes import RELEASED_CLASSIFIER_WIDTH, SIZINGS, default_latent, released_sizes

__all__ = [
    "DCDConv2d",
    "DCDLinear",
    "default_latent",
    "released_sizes",
    "convert_released_state_dict",
    "is_released_state_dict",
    "RELEASED_CLASSIFIER_WIDTH",
    "RELEASED_LAYOUT",
    "PATHS",
    "SIZINGS",
    "VARIANTS",
]
