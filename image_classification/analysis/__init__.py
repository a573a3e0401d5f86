"""Analysis tools, one CLI each (PNG + CSV out):

* ``python -m image_classification.analysis.gradcam``: Grad-CAM of several checkpoints side by side (PEDConv
  appendix A);
* ``python -m image_classification.analysis.coefficients``: per-layer variance of the dynamic coefficients over
  validation images (DCD Fig. 6 for DCD's Phi; the same for PEDConv's gamma/phi/psi) and their histograms;
* ``python -m image_classification.analysis.weights``: how much each layer's per-sample effective weight varies
  across inputs.
"""
