"""Training and evaluation: the program behind ``main.py``.

Modules: :mod:`.cli` (flags, ``--config`` recipes, validation), :mod:`.trainer` (``main``: the run),
:mod:`.build` (data, model, optimizer and resume state from the arguments), :mod:`.engine` (one epoch,
one validation pass, non-finite loss detection), :mod:`.optim` (SGD / TF-style RMSProp / AdamW with
weight-decay groups, LR schedules), :mod:`.adversarial` (free adversarial training, PGD evaluation), :mod:`.precise_bn`
(BatchNorm statistics recomputed over training batches), :mod:`.logger` (DLLogger raport writer, progress; the
reader is :func:`image_classification.reporting.read_raport`), :mod:`.distributed` (process group,
collectives, argument agreement across ranks), :mod:`.peers` (heartbeats and naming a lost rank).

Checkpoints: :mod:`.checkpoint_save` (atomic writes), :mod:`.checkpoint_load` (safe reading),
:mod:`.weight_loading` (weights into a model, foreign layouts), :mod:`.random_state` (RNG capture and
restore), :mod:`.shutdown` (SIGTERM/SIGINT as a flag), :mod:`.workspace` (writability check, workspace lock,
files of an earlier run), :mod:`.errors` (:class:`CheckpointError`); :mod:`.checkpoint` gathers their public
names.
"""
