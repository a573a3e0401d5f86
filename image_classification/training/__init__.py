"""Training and evaluation: the program behind ``main.py``.

Modules: :mod:`.cli` (flags, ``--config`` recipes, validation), :mod:`.trainer` (``main``: the run),
:mod:`.build` (data, model, optimizer and resume state from the arguments), :mod:`.engine` (one epoch,
one validation pass, non-finite loss detection), :mod:`.optim` (SGD / TF-style RMSProp / AdamW with
weight-decay groups, LR schedules), :mod:`.adversarial` (free adversarial training, PGD evaluation), :mod:`.precise_bn`
(BatchNorm statistics recomputed over training batches), :mod:`.logger` (DLLogger raport writer, progress; the
reader is :func:`image_classification.reporting.read_raport`), :mod:`.distributed` (process group,
collectives, argument agreement across ranks), :mod:`.peers` (heartbeats and naming a lost rank).

Checkpoints: the :mod:`.checkpoint` package (atomic writes, safe reading, weights into a model and foreign
layouts, RNG capture and restore, SIGTERM/SIGINT as a flag, writability check, workspace lock, files of an
earlier run, :class:`CheckpointError`); its ``__init__`` is the one door to it.
"""
