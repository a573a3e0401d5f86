"""The dynamic convolutions PEDConv is compared with, each registered as an operator on import.

================================  ==========================================================================
:mod:`.dcd`                       DCD, dynamic convolution decomposition (Li et al., ICLR 2021), and DYCls
:mod:`.dyconv`                    DY-Conv, attention over K kernels (Chen et al., CVPR 2020)
:mod:`.condconv`                  CondConv, routing over K experts (Yang et al., NeurIPS 2019)
:mod:`.kernel_mixture`            what DY-Conv and CondConv share: a per-sample mixture of K kernels
:mod:`.odconv`                    ODConv, omni-dimensional attention (Li et al., ICLR 2022)
:mod:`.involution`                Involution (Li et al., CVPR 2021)
================================  ==========================================================================
"""

from .condconv import CondConv2d
from .dcd import DCDConv2d, DCDLinear
from .dyconv import DyConv2d
from .involution import Involution2d
from .kernel_mixture import KernelMixtureConv2d
from .odconv import ODConv2d

__all__ = ["CondConv2d", "DCDConv2d", "DCDLinear", "DyConv2d", "Involution2d", "KernelMixtureConv2d", "ODConv2d"]
