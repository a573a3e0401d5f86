"""Training and evaluation: the program behind ``main.py``.

Modules: :mod:`.cli` (flags, ``--config`` recipes, validation), :mod:`.trainer` (``main``: the run),
:mod:`.build` (data, model, optimizer and resume state from the arguments), :mod:`.engine` (one epoch,
one validation pass, non-finite loss detection), :mod:`.optim` (SGD / TF-style RMSProp / AdamW with
weight-decay groups, LR schedules), :mod:`.adversarial` (free adversarial training, PGD evaluation), :mod:`.precise_bn`
(BatchNorm statistics recomputed over training batches), :mod:`.logger` (DLLogger raport, progress,
``read_raport``), :mod:`.distributed` (process group, collectives, argument agreement across ranks),
:mod:`.peers` (heartbeats and naming a lost rank), :mod:`.checkpoint` (atomic checkpoints, workspace lock,
weight loading, RNG state, signals).
"""
