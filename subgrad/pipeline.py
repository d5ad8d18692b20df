"""``subgrad.pipeline`` is ``subgrad.training.pipeline`` (the same module object): the name stays importable."""

import sys

from .training import pipeline

sys.modules[__name__] = pipeline
