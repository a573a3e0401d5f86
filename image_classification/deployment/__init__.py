"""Shipping a trained model: BatchNorm folded into the convolutions before it (:mod:`.bn_folding`) and a checkpoint
rebuilt for inference with the validation preprocessing of its dataset (:mod:`.inference`). The programs that use
them are ``classify.py`` (``tools/classify.py``) and ``tools/export.py``.
"""
