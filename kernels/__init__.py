"""subgrad.kernels: Triton kernels for parameter updates, each with a pure-torch twin.

Every public function takes ``backend="triton" | "torch" | None``; ``None`` picks Triton for CUDA
tensors and the twin otherwise, and the environment variable ``SUBGRAD_BACKEND`` overrides that
choice (tests set it to ``triton`` with ``TRITON_INTERPRET=1`` to run the kernels on the CPU).
Kernel and twin give bit-identical results; see ``_common.py`` for how.  A launched ``@triton.jit``
kernel is named ``*_kernel`` (the other jit functions are device helpers): ``subgrad.testing`` finds and
records every launch by that name.

=====================  =====================  ==========================
op                     file                   test
=====================  =====================  ==========================
philox_normal/_rad.    kernels/philox.py      tests/test_philox.py
perturb_, _launcher    kernels/perturb.py     tests/test_perturb.py
zo_update_             kernels/zo_update.py   tests/test_zo_update.py
zo_estimate_           kernels/zo_update.py   tests/test_zo_update.py
perturb_activity       kernels/activity.py    tests/test_activity_kernels.py
activity_gradient      kernels/activity.py    tests/test_activity_kernels.py
next_step_seed_        kernels/seeds.py       tests/test_seeds.py
sgd_step_, _launcher   kernels/sgd.py         tests/test_sgd_adamw.py
adamw_step_, _launcher kernels/adamw.py       tests/test_sgd_adamw.py
=====================  =====================  ==========================
"""

from ._common import BACKENDS, resolve_backend
from .activity import activity_gradient, perturb_activity, site_signs, takes_twin
from .adamw import adamw_launcher, adamw_step_
from .grad_table import GradTable
from .perturb import perturb_, perturb_launcher
from .philox import philox_bits, philox_normal, philox_rademacher, prepare_cpu_twin
from .seeds import next_step_seed_, step_seed
from .sgd import sgd_launcher, sgd_step_
from .zo_update import make_block_starts, zo_estimate_, zo_update_

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "philox_normal",
    "philox_rademacher",
    "philox_bits",
    "prepare_cpu_twin",
    "perturb_",
    "perturb_launcher",
    "next_step_seed_",
    "step_seed",
    "zo_update_",
    "zo_estimate_",
    "make_block_starts",
    "perturb_activity",
    "activity_gradient",
    "site_signs",
    "takes_twin",
    "sgd_step_",
    "sgd_launcher",
    "adamw_step_",
    "adamw_launcher",
    "GradTable",
]
