"""``subgrad.train`` is ``subgrad.training.loop`` (the same module object): the name stays importable."""

import sys

from .training import loop

sys.modules[__name__] = loop
