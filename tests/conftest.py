"""Suite-wide settings: PEDConv's path autotuner is off (``path=auto`` uses its deterministic shape heuristic).

Set in the environment, so that ``main.py`` subprocesses inherit it; tests of the autotuner switch it on
explicitly (``autotune.set_autotune(True)``, or ``PEDCONV_AUTOTUNE=1`` for a subprocess).
"""

import os

os.environ.setdefault("PEDCONV_AUTOTUNE", "0")
