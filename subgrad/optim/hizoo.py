"""HiZOO: zeroth-order SGD preconditioned by a diagonal curvature estimate, updated in the step's kernel."""

from __future__ import annotations

from .replicas import Replicas
from .zo_estimate import Estimate
from .zo_layout import Segment
from .zo_settings import DEFAULT_LR, ZOSettings, refuse_other_settings, require
from .zo_sgd import ZOSGD, ZOOptimizer


class HiZOO(ZOSGD):
    """Hessian-informed zeroth-order SGD, after HiZOO (Zhao et al., 2024).

    Keeps a diagonal curvature estimate ``h`` (HiZOO's Sigma^-1, one float32 buffer, initialised to 1)
    and perturbs along the preconditioned direction ``z / sqrt(h)``.  Each step evaluates the unperturbed
    loss too (2q + 1 forwards) and takes the second difference along each direction,
    ``kappa = |L+ + L- - 2 L0| / (2 eps^2)``, which updates h in the same kernel pass as the step:

        w -= lr * c * z / sqrt(h)
        h  = max(h * ((1 - hessian_smoothing) + hessian_smoothing * kappa * z^2), hessian_min)

    Coordinates that see high curvature take smaller steps.  Central differences only.  Memory: one
    float32 buffer the size of the model (plus ZOSGD's momentum buffer if momentum is used).
    The second difference divides float32 loss rounding (~1e-7 relative) by ``2 eps^2``: with eps = 1e-3
    kappa carries noise of order 0.1-1, so prefer eps >= 1e-2 when the curvature should mean something.
    """

    needs_base_loss = True
    _buffer_keys = ("master", "momentum_buffer", "hessian")

    def __init__(
        self,
        params,
        lr: float = DEFAULT_LR,
        eps: float = ZOSettings.eps,
        q: int = ZOSettings.q,
        distribution: str | None = ZOSettings.distribution,
        blocks=ZOSettings.blocks,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        clip: float | None = ZOSettings.clip,
        hessian_smoothing: float = 1e-3,
        hessian_min: float = 1e-4,
        seed: int = ZOSettings.seed,
        backend: str | None = ZOSettings.backend,
        master_weights: bool | None = ZOSettings.master_weights,
        scale_by_block_size: bool = ZOSettings.scale_by_block_size,
        replicas: Replicas | None = None,
    ):
        require(
            "hessian_smoothing",
            isinstance(hessian_smoothing, (int, float)) and 0 <= hessian_smoothing <= 1,
            "a number in [0, 1]",
            hessian_smoothing,
        )
        require("hessian_min", isinstance(hessian_min, (int, float)) and hessian_min > 0, "a number > 0", hessian_min)
        ZOOptimizer.__init__(
            self,
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, l1=l1),
            ZOSettings.from_arguments(locals(), estimator="central"),
            replicas,
        )
        self.hessian_smoothing, self.hessian_min = hessian_smoothing, hessian_min

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["subgrad"].update(hessian_smoothing=self.hessian_smoothing, hessian_min=self.hessian_min)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        meta = state_dict.get("subgrad")
        if isinstance(meta, dict):
            refuse_other_settings(meta, dict(hessian_smoothing=self.hessian_smoothing, hessian_min=self.hessian_min))
        super().load_state_dict(state_dict)

    def _init_state(self) -> None:
        super()._init_state()
        for seg in self._segments:
            self._flat_buffer(seg.flat, seg.buffers, "hessian", fill=1.0)  # h = 1: plain directions at first

    def _hessian_args(self, seg: Segment, estimate: Estimate) -> dict:
        return dict(
            hessian=seg.buffers["hessian"],
            curvature=self._segment_c(seg, estimate.curvature / self.settings.q),
            hessian_smoothing=self.hessian_smoothing,
            hessian_min=self.hessian_min,
        )
