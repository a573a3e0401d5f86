"""The programs, above the library (as timm keeps ``train.py``/``validate.py``/``benchmark.py`` beside
``timm/`` and pycls keeps ``tools/`` beside ``pycls/``). Each module runs as
``python -m image_classification.tools.NAME --help``; no module outside this package imports one of them.

=========================  ==============================================================================
``profiler``               parameters, MACs, latency, memory of an (arch, operator, placement); ``--table``
``paper_tables``           the papers' count tables the profiler's ``--table`` prints (no command line)
``benchmark``              single-layer forward/training timing of every operator and PEDConv path
``triton_pedconv_check``   exactness and timing of the Triton PEDConv kernel on a GPU
``gpu_report``             one Markdown summary of ``scripts/gpu_checks.sh``'s output folder
``export``                 ONNX / TorchScript export of a checkpoint, verified against eager
``classify``               top-k classes of image files with a checkpoint
``gradcam``                Grad-CAM of several checkpoints side by side (PEDConv appendix A)
``coefficients``           variance of the dynamic coefficients over images (DCD Fig. 6)
``weight_variation``       how much each layer's per-sample weight varies across inputs
``train_detection``        SSD300 training and COCO evaluation (PEDConv Table 2)
``train_segmentation``     PSPNet / UperNet training and ADE20K evaluation (PEDConv Table 3)
``synthetic_detection``    a tiny synthetic COCO-layout set
``synthetic_segmentation`` a tiny synthetic ADE20K-layout set
``synthetic_cli``          the shared command line of the two synthetic-set writers (no command line)
=========================  ==============================================================================
"""
