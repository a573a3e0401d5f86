"""Image classification with dynamic convolutions (PEDConv and peers)."""

from .compat import check_torch_version

check_torch_version()  # one line naming the installed and the required torch, before anything else fails
