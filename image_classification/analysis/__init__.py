"""What the analysis programs compute, as library functions (their command lines are in
:mod:`image_classification.tools`):

* :mod:`.gradcam`: Grad-CAM of several checkpoints side by side (PEDConv appendix A);
  ``python -m image_classification.tools.gradcam``;
* :mod:`.coefficients`: per-layer variance of the dynamic coefficients over validation images (DCD Fig. 6 for
  DCD's Phi; the same for PEDConv's gamma/phi/psi) and their histograms;
  ``python -m image_classification.tools.coefficients``;
* :mod:`.weights`: how much each layer's per-sample effective weight varies across inputs;
  ``python -m image_classification.tools.weight_variation``;
* :mod:`.common`: loading a checkpoint for analysis, the shared data flags, atomic CSV and figure writing.
"""
