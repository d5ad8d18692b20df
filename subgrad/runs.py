"""``subgrad.runs`` is ``subgrad.training.runs`` (the same module object): the name stays importable."""

import sys

from .training import runs

sys.modules[__name__] = runs
