"""subgrad.optim: zeroth-order optimizers (forward passes only) and fused first-order ones.

=============  ==========================================  =========================
class          what                                        file
=============  ==========================================  =========================
ZOSGD          finite-difference SGD (central/forward/jvp)  subgrad/optim/zo_sgd.py
ZOAdam         Adam moments on the ZO estimate              subgrad/optim/zo_adam.py
HiZOO          ZO-SGD preconditioned by diagonal curvature  subgrad/optim/hizoo.py
ActivityZO     per-example activity perturbation, local     subgrad/optim/activity.py
               losses (``--optimizer zo``)
SGD, AdamW     torch.optim semantics, fused kernels         subgrad/optim/first_order.py
=============  ==========================================  =========================

Both families share one base, ``FlatOptimizer`` (``_flat_optimizer.py``): parameters packed into flat
buffers, state as views into flat state buffers, repacked with state carried when parameters change.
The zeroth-order family: estimation settings, one frozen ``ZOSettings`` (``zo_settings.py``); the packed
parameters and their estimation blocks (``zo_layout.py``); the estimators as functions
(``zo_estimate.py``); data-parallel ranks passed at construction (``replicas.py``).
"""

from ..kernels import step_seed
from .activity import ActivityZO
from .first_order import SGD, AdamW
from .hizoo import HiZOO
from .zo_adam import ZOAdam
from .zo_settings import ZOSettings
from .zo_sgd import ZOSGD, ZOOptimizer

__all__ = ["ActivityZO", "ZOSGD", "ZOAdam", "HiZOO", "ZOOptimizer", "ZOSettings", "SGD", "AdamW", "step_seed"]
