"""A zeroth-order optimizer's estimation settings: one frozen, validated :class:`ZOSettings`.

ZOSGD, ZOAdam and HiZOO read their signature defaults from this class (``eps: float = ZOSettings.eps``),
so each default has one home; a ``state_dict`` records :data:`SAVED_SETTINGS` and loading refuses a
state saved with other values (:func:`refuse_other_settings`).
"""

from __future__ import annotations

import dataclasses
import math

from .. import kernels as K
from ..kernels._common import f32, require  # noqa: F401 (require: the optimizers' check style)

ESTIMATORS = ("central", "forward", "jvp")
#: ZOSGD's, ZOAdam's and HiZOO's learning rate when none is given (torch.optim.SGD's too): with their other
#: defaults it lowers the loss of a small user CNN, LeNet and ResNet-20 over 200 steps without a blow-up,
#: where 1e-2 sends ZOSGD on ResNet-20 and ZOAdam on LeNet up (benchmarks/zo_defaults.py, benchmarks/README.md)
DEFAULT_LR = 1e-3
BLOCK_MODES = (None, "tensor", "module")


def default_distribution(q: int) -> str:
    """Directions when none is asked for: Rademacher when a step averages several (q > 1: about 4x cheaper
    to draw than Box-Muller normals, and q averages its coarser variance away), gaussian for one."""
    return "rademacher" if q > 1 else "gaussian"


@dataclasses.dataclass(frozen=True)
class ZOSettings:
    """How a zeroth-order optimizer estimates: one validated, immutable object (``optimizer.settings``)
    that ZOSGD, ZOAdam and HiZOO build from their keyword arguments (documented on :class:`ZOSGD`)."""

    eps: float = 1e-3
    q: int = 1
    estimator: str = "central"
    distribution: str | None = None  # None: default_distribution(q)
    blocks: str | int | None = None
    clip: float | None = None
    seed: int = 0
    backend: str | None = None
    master_weights: bool | None = None
    scale_by_block_size: bool = False

    @classmethod
    def from_arguments(cls, arguments: dict, **fixed) -> "ZOSettings":
        """The settings among an optimizer constructor's arguments (its ``locals()``), plus ``fixed`` ones;
        the constructors' defaults are this class's (``eps: float = ZOSettings.eps``), so each has one home."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in arguments.items() if k in names}, **fixed)

    def __post_init__(self):
        eps, q, blocks, clip, seed = self.eps, self.q, self.blocks, self.clip, self.seed
        if self.distribution is None and isinstance(q, int):
            object.__setattr__(self, "distribution", default_distribution(q))
        require("eps", isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0, "a finite number > 0", eps)
        require("q", isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= 2**16, "an int in [1, 65536]", q)
        require("estimator", self.estimator in ESTIMATORS, f"one of {ESTIMATORS}", self.estimator)
        require(
            "distribution",
            self.distribution in K.philox.DISTRIBUTIONS,
            f"one of {K.philox.DISTRIBUTIONS}",
            self.distribution,
        )
        require(
            "blocks",
            blocks in BLOCK_MODES or (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1),
            "None, 'tensor', 'module' or an int block size >= 1",
            blocks,
        )
        require("clip", clip is None or (isinstance(clip, (int, float)) and clip > 0), "None or a number > 0", clip)
        require("seed", isinstance(seed, int) and 0 <= seed < 2**62, "an int in [0, 2**62)", seed)
        require("backend", self.backend in (None, *K.BACKENDS), f"None or one of {K.BACKENDS}", self.backend)
        object.__setattr__(self, "eps", f32(eps))  # the kernels perturb by the float32 eps: divide by that one
        object.__setattr__(self, "scale_by_block_size", bool(self.scale_by_block_size))


#: The settings a state_dict records and load_state_dict must find equal: every ZOSettings field that
#: changes the numbers.  The seed is state (loaded, not compared); the backend changes no bits.
SAVED_SETTINGS = tuple(f.name for f in dataclasses.fields(ZOSettings) if f.name not in ("seed", "backend"))


def refuse_other_settings(saved: dict, current: dict) -> None:
    """One-line refusal of a state saved with other settings (keys a state predates are not compared)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"state_dict was saved with {key}={saved[key]!r} but this optimizer has "
                f"{key}={value!r}; construct it with the saved settings"
            )
