"""``subgrad.config`` is ``subgrad.training.config`` (the same module object): the name stays importable."""

import sys

from .training import config

sys.modules[__name__] = config
