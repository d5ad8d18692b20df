"""ZOAdam: Adam(W) moments on the zeroth-order gradient estimate, materialised once per step."""

from __future__ import annotations

import torch

from .. import kernels as K
from . import zo_estimate
from .replicas import Replicas
from .zo_estimate import Estimate
from .zo_settings import DEFAULT_LR, ZOSettings, require
from .zo_sgd import ZOOptimizer


class ZOAdam(ZOOptimizer):
    """Adam(W) moments on the zeroth-order gradient estimate ``g = sum_k c_k z_k / q``.

    Same estimation arguments as :class:`ZOSGD`; ``betas``, ``adam_eps`` and decoupled ``weight_decay``
    as in ``torch.optim.AdamW``.  Memory: three float32 buffers the size of the model (first and
    second moments, and the materialised estimate the Adam kernel reads), plus the fp32 master copy for
    half-precision parameters; ZOSGD without momentum needs none.
    """

    _buffer_keys = ("master", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = DEFAULT_LR,
        eps: float = ZOSettings.eps,
        q: int = ZOSettings.q,
        estimator: str = ZOSettings.estimator,
        distribution: str | None = ZOSettings.distribution,
        blocks=ZOSettings.blocks,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        clip: float | None = ZOSettings.clip,
        seed: int = ZOSettings.seed,
        backend: str | None = ZOSettings.backend,
        master_weights: bool | None = ZOSettings.master_weights,
        scale_by_block_size: bool = ZOSettings.scale_by_block_size,
        replicas: Replicas | None = None,
    ):
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        require("adam_eps", isinstance(adam_eps, (int, float)) and adam_eps > 0, "a number > 0", adam_eps)
        super().__init__(
            params,
            dict(lr=lr, betas=tuple(betas), adam_eps=adam_eps, weight_decay=weight_decay, l1=l1),
            ZOSettings.from_arguments(locals()),
            replicas,
        )

    def _init_state(self) -> None:
        for seg in self._segments:
            for key in ("exp_avg", "exp_avg_sq"):
                self._flat_buffer(seg.flat, seg.buffers, key)

    def _scratch(self, seg) -> torch.Tensor:
        """The float32 buffer a segment's estimate is materialised into: kept with the layout (one per
        device, as large as the largest segment), so a step allocates nothing."""
        key = ("estimate", seg.data.device)
        scratch = self.layout.prepared.get(key)
        if scratch is None:
            size = max(s.numel for s in self._segments if s.data.device == seg.data.device)
            scratch = self.layout.prepared[key] = torch.empty(size, dtype=torch.float32, device=seg.data.device)
        return scratch[: seg.numel]

    def _update(self, c: torch.Tensor, seed: torch.Tensor, estimate: Estimate, finite: torch.Tensor) -> None:
        if estimate.pending is not None:
            zo_estimate.move_block(
                self.layout, self.settings, None, seed, estimate.pending.index, estimate.pending.level, 0.0
            )
        for seg in self._segments:
            group = self.param_groups[seg.group_index]
            g = K.zo_estimate_(
                self._scratch(seg),
                seed,
                self._segment_c(seg, c),
                num_directions=self.settings.q,
                block_starts=seg.block_starts,
                offset=seg.dir_offset,
                distribution=self.settings.distribution,
                backend=self.settings.backend,
                validate_args=False,
            )
            weights = seg.master if seg.master is not None else seg.data
            beta1, beta2 = group["betas"]
            K.adamw_step_(
                weights,
                g,
                seg.buffers["exp_avg"],
                seg.buffers["exp_avg_sq"],
                step=self.counters.steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["adam_eps"],
                weight_decay=group["weight_decay"],
                l1=group["l1"],
                gate=finite,  # closed: moments and master untouched (a NaN estimate never reaches them)
                backend=self.settings.backend,
                validate_args=False,
            )
            if seg.master is not None:
                seg.data.copy_(seg.master)
