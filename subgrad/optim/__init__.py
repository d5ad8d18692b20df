"""subgrad.optim: zeroth-order optimizers (forward passes only) and fused first-order ones.

=============  ==========================================  =========================
class          what                                        file
=============  ==========================================  =========================
ZOSGD          finite-difference SGD (central/forward/jvp)  subgrad/optim/zo.py
ZOAdam         Adam moments on the ZO estimate              subgrad/optim/zo.py
HiZOO          ZO-SGD preconditioned by diagonal curvature  subgrad/optim/hizoo.py
ActivityZO     per-example activity perturbation, local     subgrad/optim/activity.py
               losses (``--optimizer zo``)
SGD, AdamW     torch.optim semantics, fused kernels         subgrad/optim/first_order.py
=============  ==========================================  =========================

Both families share one base, ``FlatOptimizer`` (subgrad/optim/_layout.py): parameters packed into flat
buffers, state as views into flat state buffers, repacked with state carried when parameters change.
A zeroth-order optimizer's estimation settings are one frozen ``ZOSettings`` (``optimizer.settings``).
"""
from .activity import ActivityZO
from .first_order import SGD, AdamW
from .hizoo import HiZOO
from .zo import ZOSGD, ZOAdam, ZOOptimizer, ZOSettings, step_seed

__all__ = ["ActivityZO", "ZOSGD", "ZOAdam", "HiZOO", "ZOOptimizer", "ZOSettings", "SGD", "AdamW", "step_seed"]
