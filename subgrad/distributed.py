"""``subgrad.distributed`` is ``subgrad.training.distributed`` (the same module object): the name stays importable."""

import sys

from .training import distributed

sys.modules[__name__] = distributed
