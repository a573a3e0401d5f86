"""Training and evaluation: the program behind ``main.py``.

Modules: :mod:`.cli` (flags, ``--config`` recipes, validation), :mod:`.trainer` (``main``: the run),
:mod:`.build` (data, model, optimizer and resume state from the arguments), :mod:`.engine` (one epoch,
one validation pass), :mod:`.optim` (SGD groups, LR schedule), :mod:`.logger` (DLLogger raport, progress,
``read_raport``), :mod:`.distributed` (process group, collectives), :mod:`.checkpoint` (atomic checkpoints,
weight loading, RNG state, signals).
"""
