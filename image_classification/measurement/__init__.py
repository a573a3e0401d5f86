"""Measuring models: this project's parameter and MAC counts next to the papers' tables
(:mod:`.paper_tables`), a dynamic model's latency, training memory and peak RSS against its static twin
(:mod:`.latency`), exported models in ONNX Runtime against the static export (:mod:`.onnx_runtime`) and the
choice of PEDConv's export form per layer (:mod:`.pedconv_export`). The programs that print them are
``tools/profiler.py``, ``tools/paper_tables.py`` and ``tools/export.py``; the Fashion-MNIST study and the tests
use the same functions.
"""

from .latency import calibrate_batchnorm, count_calls, measure_latency, peak_rss_training, training_memory
from .paper_tables import profile_model, table_rows

__all__ = ["calibrate_batchnorm", "count_calls", "measure_latency", "peak_rss_training", "profile_model",
           "table_rows", "training_memory"]
