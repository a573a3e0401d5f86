"""Reading run logs and reporting results.

Modules: :mod:`.raport` (the one reader of DLLogger raports and queries over their records),
:mod:`.run_summary` (one row per run, the results table of ``scripts/collect_results.py``),
:mod:`.fashion_mnist_study` (the Fashion-MNIST operator study's tables, figure and report page).
"""

from .raport import (
    PREFIX,
    epoch_metrics,
    iteration_metrics,
    loss_curve,
    parameters,
    raport_values,
    read_raport,
)
from .run_summary import RunSummary, markdown_table, summarize

__all__ = [
    "PREFIX",
    "RunSummary",
    "epoch_metrics",
    "iteration_metrics",
    "loss_curve",
    "markdown_table",
    "parameters",
    "raport_values",
    "read_raport",
    "summarize",
]
