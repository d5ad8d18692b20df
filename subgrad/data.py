"""``subgrad.data`` is ``subgrad.training.data`` (the same module object): the name stays importable."""

import sys

from .training import data

sys.modules[__name__] = data
