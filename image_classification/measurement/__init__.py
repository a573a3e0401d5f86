"""Measuring models: this project's parameter and MAC counts next to the papers' tables (:mod:`.paper_tables`,
counted by :mod:`.macs`), a dynamic model's latency, training memory and peak RSS against its static twin
(:mod:`.latency`; the memory meters: :mod:`.memory`), the input pipeline (:mod:`.input_pipeline`), exported models
in ONNX Runtime against the static export (:mod:`.onnx_runtime`) and the choice of PEDConv's export form per layer
(:mod:`.pedconv_export`). The programs that print them are ``tools/profiler.py``, ``tools/paper_tables.py``,
``tools/benchmark.py``, ``tools/loader_benchmark.py`` and ``tools/export.py``; the Fashion-MNIST study and the
tests use the same functions.
"""

from .latency import LatencyConfig, calibrate_batchnorm, count_calls, measure_latency, peak_rss_training
from .memory import cuda_peak_bytes, saved_tensor_storages, training_memory
from .paper_tables import profile_model, table_rows

__all__ = ["LatencyConfig", "calibrate_batchnorm", "count_calls", "cuda_peak_bytes", "measure_latency",
           "peak_rss_training", "profile_model", "saved_tensor_storages", "table_rows", "training_memory"]
