"""subgrad.optim: zeroth-order optimizers (forward passes only) and fused first-order ones."""
from .zo import ZOSGD, ZOOptimizer, step_seed

__all__ = ["ZOSGD", "ZOOptimizer", "step_seed"]
