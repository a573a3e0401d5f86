"""The PEDConv family (Hou & Kung, BMVC 2021): the layer, its execution paths and how one is chosen, and
what is built around it.

=====================  ========================================================================
:mod:`.layer`          :class:`PEDConv2d` (Eq. 1-7) and the partial generator sharing of Appendix D
:mod:`.spatial`        spatially varying PEDConv (``pedconv_spatial``)
:mod:`.common`         what both share: the CP options, the info-max base class, initialisations
:mod:`.paths`          the exact execution paths (``reference``, ``fold``, ``patch_gemm``, ...) and the heuristic
:mod:`.export_forms`   the export forms: paths whose convolutions take constant weights (ONNX Runtime, TensorRT)
:mod:`.kernels`        the custom autograd Functions the fast paths run
:mod:`.selection`      the tuning key and the autotuned choice of a path for one forward
:mod:`.report`         which path each layer used, per input shape
:mod:`.triton`         the fused Triton implicit GEMM (CUDA) and :mod:`.triton_kernels`, its kernels
:mod:`.authors`        the authors' released checkpoint layout and its converter
:mod:`.counts`         closed-form per-layer counts, batch sums of the per-sample weights
=====================  ========================================================================
"""

from .authors import AUTHORS_LAYOUT, AUTHORS_MARKER, convert_authors_state_dict
from .counts import pedconv_layer_macs, pedconv_layer_params, pedconv_weight_sums
from .export_forms import EXPORT_FORMS, applicable_forms, form_rule
from .layer import COMPONENTS, GROUPED_MAX_WEIGHT_RATIO, MIN_HIDDEN, PATHS, PEDConv2d, share_generator
from .report import auto_path_layers, format_path_report, has_auto_paths, path_report, reset_path_report
from .spatial import SpatialPEDConv2d

__all__ = [
    "AUTHORS_LAYOUT",
    "AUTHORS_MARKER",
    "COMPONENTS",
    "EXPORT_FORMS",
    "GROUPED_MAX_WEIGHT_RATIO",
    "MIN_HIDDEN",
    "PATHS",
    "PEDConv2d",
    "SpatialPEDConv2d",
    "applicable_forms",
    "auto_path_layers",
    "convert_authors_state_dict",
    "form_rule",
    "format_path_report",
    "has_auto_paths",
    "path_report",
    "pedconv_layer_macs",
    "pedconv_layer_params",
    "pedconv_weight_sums",
    "reset_path_report",
    "share_generator",
]
