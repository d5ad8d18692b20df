"""Zeroth-order optimizers: gradient estimates from forward passes only.

One step of :class:`ZOSGD` with central differences (``estimator="central"``) and q directions:

    for k in 0..q-1, for each block b:       z_k = philox direction with seed s_t + k
        w_b += eps z_k        L+ = closure()
        w_b -= 2 eps z_k      L- = closure()
        w_b += eps z_k        (restore; the last one is fused into the update)
        c[k, b] = (L+ - L-) / (2 eps)          clipped to [-clip, clip] when clip is set
    w -= lr * (sum_k c[k, b(w)] z_k / q + weight_decay w + l1 sign(w))    (one kernel pass per segment)

``estimator="forward"`` uses ``(L+ - L0) / eps`` with one shared ``L0 = closure()``;
``estimator="jvp"`` takes the exact directional derivative from ``torch.func.jvp`` (a forward-mode
baseline with the same interface; it needs ``functional_closure``).  Directions are regenerated from
seeds, never stored: besides the model, the optimizer keeps only a momentum buffer (with momentum) and
an fp32 master copy for bfloat16/float16 parameters (restores are exact with it).

Every ``closure()`` call happens under ``torch.no_grad()``.  With ``functional_closure(params)`` (a
function of a ``{name: tensor}`` dict, for example via ``torch.func.functional_call``), all perturbed
points of a step are evaluated in one ``torch.func.vmap`` call instead of sequential forwards.

A step never reads a device value on the host.  Its direction seed comes from a step counter on the
device (``StepCounters``), the finite-difference scalars stay on the device and the update kernels read
them, the seed, a tensor ``lr`` and the skip decision through pointers, so the step's launches are the
same at every step and the whole step can be captured in a CUDA graph.  A non-finite loss on either
side skips the update on the device (the update kernel only restores the weights) and counts it;
``optimizer.skipped_steps`` reads the count (and warns once) when asked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .. import kernels as K
from . import zo_estimate
from ._counters import StepCounters
from ._flat_optimizer import FlatOptimizer
from .replicas import Replicas
from .zo_estimate import Estimate
from .zo_layout import Segment, ZOLayout, assign_blocks, block_ranges, build_segments
from .zo_settings import (
    DEFAULT_LR,
    SAVED_SETTINGS,
    ZOSettings,
    refuse_other_settings,
    require,
)


class ZOOptimizer(FlatOptimizer):
    """Shared machinery: packing into a :class:`ZOLayout`, the step (estimation is :mod:`.zo_estimate`'s),
    skipping and state.  Subclasses apply the update."""

    #: central differences also evaluate the unperturbed loss L0 (HiZOO: second differences)
    needs_base_loss = False

    def __init__(self, params, defaults: dict, settings: ZOSettings, replicas: Replicas | None = None):
        for key in ("lr", "weight_decay", "l1", "momentum"):
            if key in defaults:
                value = defaults[key]
                if key == "lr" and isinstance(value, torch.Tensor):  # read by the kernels at every step
                    require(
                        key,
                        value.numel() == 1 and value.is_floating_point(),
                        "a number or a 1-element floating-point tensor",
                        value,
                    )
                    value = float(value)
                require(
                    key,
                    isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                    "a finite number >= 0",
                    value,
                )
        if defaults.get("momentum", 0) >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {defaults['momentum']}")
        super().__init__(params, defaults)
        self.settings = settings
        self.replicas = replicas
        self.counters = StepCounters(type(self).__name__)
        self._passes_counted = (0, 0)  # (forward passes, steps) up to the last repack or load
        self.layout: ZOLayout | None = None
        self._packed_for: tuple = ()  # the trainable parameters of each group when packed
        self._packed_key: tuple = ()  # _packing_key() when last packed or checked
        self._flats = []
        self.last_estimate: torch.Tensor | None = None

    # -- layout ------------------------------------------------------------------------------------
    def _param_names(self) -> dict[int, str | None]:
        names = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                names[id(p)] = group["param_names"][i] if "param_names" in group else None
        return names

    def _pack(self) -> ZOLayout:
        """The layout; rebuilt when the trainable parameters changed (``add_param_group``,
        ``requires_grad`` toggled between steps), every parameter's state carried over."""
        key = self._packing_key()
        if self.layout is not None and key == self._packed_key:
            return self.layout
        if self.layout is None or self._packed_for != self._trainable():
            names = self._param_names()
            if self.settings.blocks == "module" and any(n is None for n in names.values()):
                raise ValueError("blocks='module' needs parameter names: pass model.named_parameters()")
            devices = {p.device for g in self.param_groups for p in g["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"params are on several devices {sorted(map(str, devices))}; a zeroth-order "
                    "step perturbs them with one direction, so move the model to one device"
                )
            if self.layout is not None:  # passes so far were counted at the old number of blocks
                self._passes_counted = (self.forward_passes, self.counters.steps_taken())
            self._flats, segments = build_segments(self.param_groups, self.settings.master_weights)
            ranges, num_blocks = block_ranges(segments, self.settings.blocks, names)
            assign_blocks(segments, ranges, num_blocks)
            sizes = torch.zeros(num_blocks, dtype=torch.float64)
            for a, b, bid in ranges:
                sizes[bid] += b - a
            # Step-size rule for blocks: the variance of a block's estimate grows with its size d_B, and the
            # stable step of ZO-SGD on it scales like 1 / (d_B + 2); relative to one block over all d.
            device = segments[0].data.device
            self.layout = ZOLayout(segments, num_blocks, names, ((sizes.sum() + 2) / (sizes + 2)).to(device))
            self.counters.on(device)
            self._init_state()
            self._packed_for = self._trainable()
            self._adopt_state((seg.flat, seg.buffers) for seg in segments)  # state from before a repack
            for seg in segments:
                self._bind_state(seg)
        for flat in self._flats:
            flat.check()
        self._packed_key = self._packing_key()
        return self.layout

    @property
    def _segments(self) -> list[Segment]:
        return self.layout.segments

    def _buffer_dtype(self, fg) -> torch.dtype:
        return torch.float32  # zeroth-order state (master, moments, curvature) is fp32 for every param dtype

    def _bind_state(self, seg: Segment) -> None:
        """``state[p][key]`` = a view of each of the segment's buffers, for each of its parameters."""
        for i, p in enumerate(seg.flat.params):
            for key, buf in seg.buffers.items():
                if buf is not None:
                    self.state[p][key] = seg.flat.view(buf, i)

    def _segment_buffer(self, seg: Segment, key: str, fill: float = 0.0) -> torch.Tensor:
        """A segment's state buffer ``key``, made (and bound into ``state``) on first use."""
        if seg.buffers.get(key) is None:
            self._flat_buffer(seg.flat, seg.buffers, key, fill)
            self._bind_state(seg)
        return seg.buffers[key]

    def _init_state(self) -> None:
        """Subclasses create their per-segment buffers (``seg.buffers``) here, after packing."""

    def _loss_mean(self, losses: torch.Tensor) -> torch.Tensor:
        """A step's loss vector averaged over the data-parallel ranks (a new tensor)."""
        return self.replicas.all_reduce_mean_(losses.clone())

    # -- the step ----------------------------------------------------------------------------------
    def step(
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        *,
        functional_closure: Callable[[dict], torch.Tensor] | None = None,
    ):
        """One zeroth-order step.  ``closure()`` returns the loss at the current weights (no backward);
        ``functional_closure(params)`` returns the loss for a dict of parameters and enables batched
        evaluation (required for ``estimator="jvp"``).  Returns the loss (mean of all evaluations for
        central differences, the unperturbed loss otherwise)."""
        if closure is None and functional_closure is None:
            raise ValueError("zeroth-order optimizers need closure() (or functional_closure) to evaluate the loss")
        settings = self.settings
        if settings.estimator == "jvp" and functional_closure is None:
            raise ValueError("estimator='jvp' needs functional_closure(params) for torch.func.jvp")
        layout = self._pack()
        seed = self.counters.advance(settings.seed, settings.backend)
        reduce = self._loss_mean if self.replicas is not None else None
        if settings.estimator == "jvp":
            found = zo_estimate.estimate_jvp(functional_closure, layout, seed, settings, reduce=reduce)
        elif functional_closure is not None:
            found = zo_estimate.estimate_batched(
                functional_closure, layout, seed, settings, base_loss=self.needs_base_loss, reduce=reduce
            )
        else:
            found = zo_estimate.estimate_sequential(
                closure, layout, seed, settings, base_loss=self.needs_base_loss, reduce=reduce
            )
        finite = torch.isfinite(found.losses).all()  # decided on the device: the kernels read it
        self.counters.count_skip(finite)
        c = self.last_estimate = found.c  # [q, blocks] scalars (before clipping), on the loss device
        if settings.clip is not None:
            c = c.clamp(-settings.clip, settings.clip)
        if settings.scale_by_block_size:
            c = c * layout.block_scale
        if settings.q != 1:  # dividing by 1 is exact: skipped
            c = c / settings.q
        self._update(c.to(torch.float32), seed, found, finite.reshape(1))
        return found.loss

    @property
    def num_blocks(self) -> int:
        """Estimation blocks at the current packing (each gets its own finite-difference scalar)."""
        return self._pack().num_blocks

    @property
    def step_count(self) -> int:
        """Steps taken (read from the device counter)."""
        return self.counters.steps_taken()

    @property
    def skipped_steps(self) -> int:
        """Steps whose losses were not all finite, so no update was applied (read from the device; warns
        the first time any are seen)."""
        return self.counters.skipped_steps()

    @property
    def forward_passes(self) -> int:
        """Forward passes so far (from the step counter: a step's count is fixed by the settings)."""
        passes, steps = self._passes_counted
        taken = self.step_count
        per_step = zo_estimate.passes_per_step(self.layout, self.settings, self.needs_base_loss) if self.layout else 0
        return passes if taken == steps else passes + (taken - steps) * per_step

    def _update(self, c: torch.Tensor, seed: torch.Tensor, estimate: Estimate, finite: torch.Tensor) -> None:
        """Apply the step where ``finite`` (a device bool) holds, else only restore the weights: ``c``
        [q, blocks] float32 are the scalars after clipping, block scaling and 1/q, ``seed`` the step's
        first direction seed; ``estimate`` carries the pending restore and the curvature."""
        raise NotImplementedError

    @staticmethod
    def _segment_c(seg: Segment, c: torch.Tensor) -> torch.Tensor:
        """This segment's [q, pieces] scalars, flattened direction-major, on its device."""
        if seg.every_block:  # its pieces are blocks 0, 1, ... in order: c as it is
            return c.reshape(-1)
        return c.to(seg.data.device)[:, seg.block_ids].reshape(-1)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's layout (``state`` per parameter index, ``param_groups``) plus ``subgrad``: the
        seed, the step counter and the settings, so a resumed run draws the same directions."""
        self._pack()
        state_dict = super().state_dict()
        settings = self.settings
        steps, skipped = self.counters.values()
        state_dict["subgrad"] = dict(
            kind=type(self).__name__,
            seed=settings.seed,
            step=steps,
            skipped=skipped,
            forward_passes=self.forward_passes,
            **{key: getattr(settings, key) for key in SAVED_SETTINGS},
        )
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict` of the same optimizer class and settings; values are
        copied into the flat buffers bit for bit (no dtype casts: the state is fp32 for every param dtype,
        where torch.optim would cast it to the parameter's)."""
        meta = state_dict.get("subgrad")
        if not isinstance(meta, dict) or meta.get("kind") != type(self).__name__:
            raise ValueError(f"not a {type(self).__name__} state_dict (missing or different 'subgrad' entry)")
        refuse_other_settings(meta, {key: getattr(self.settings, key) for key in SAVED_SETTINGS})
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)
        ):
            raise ValueError("state_dict has a different number of param groups or parameters than this optimizer")
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for seg in self._pack().segments:
            for i, p in enumerate(seg.flat.params):
                saved = state_dict["state"].get(index[id(p)], {})
                for key, buf in seg.buffers.items():
                    if buf is None:
                        continue
                    if key not in saved:
                        raise ValueError(f"state_dict lacks {key!r} for parameter {index[id(p)]}")
                    view = seg.flat.view(buf, i)
                    view.copy_(saved[key].reshape(view.shape))
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        self.settings = dataclasses.replace(self.settings, seed=meta["seed"])
        self.counters.load(meta["step"], meta["skipped"])
        self._passes_counted = (meta["forward_passes"], meta["step"])


class ZOSGD(ZOOptimizer):
    """Zeroth-order SGD: finite-difference gradient estimates along seeded random directions.

    Args:
        params: parameters, ``model.named_parameters()`` (needed for ``blocks="module"`` and
            ``functional_closure``), or param groups (``lr``, ``weight_decay``, ``l1``, ``momentum`` may
            differ per group; the direction always spans all groups).
        lr: learning rate (>= 0; default ``zo_settings.DEFAULT_LR``, 1e-3, which ZOAdam and HiZOO share).
        eps: perturbation size (> 0).
        q: directions per step; the estimate averages them.
        estimator: "central" (2q forwards), "forward" (q+1 forwards) or "jvp" (exact directional
            derivative via torch.func.jvp; needs ``functional_closure``).
        distribution: "gaussian" or "rademacher" directions (None: rademacher when q > 1, else gaussian).
        blocks: None (one direction scalar for everything), "tensor", "module" or an int block size:
            each block gets its own finite-difference scalar (2 forwards per block and direction).
        momentum: heavy-ball momentum on the estimate (one fp32 buffer).
        weight_decay, l1: L2 and L1 penalties added to the estimate.
        clip: clamp each finite-difference scalar to [-clip, clip].
        seed: names the run's sequence of directions.
        backend: kernel backend ("triton", "torch" or None = auto).
        master_weights: keep an fp32 master copy (default: for bfloat16/float16 parameters only).
        replicas: data-parallel ranks (:class:`subgrad.optim.replicas.Replicas`): each evaluates the same
            points on its shard of the batch and the step's losses are averaged over them; None: one process.
        scale_by_block_size: with blocks, multiply block b's scalar by ``(d + 2) / (d_b + 2)`` (d parameters
            in all, d_b in the block): the stable ZO-SGD step of a block scales like ``1 / (d_b + 2)``, so
            small blocks (biases, the last layer) take proportionally larger steps at the same ``lr``.
    """

    _buffer_keys = ("master", "momentum_buffer")

    def __init__(
        self,
        params,
        lr: float = DEFAULT_LR,
        eps: float = ZOSettings.eps,
        q: int = ZOSettings.q,
        estimator: str = ZOSettings.estimator,
        distribution: str | None = ZOSettings.distribution,
        blocks=ZOSettings.blocks,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        clip: float | None = ZOSettings.clip,
        seed: int = ZOSettings.seed,
        backend: str | None = ZOSettings.backend,
        master_weights: bool | None = ZOSettings.master_weights,
        scale_by_block_size: bool = ZOSettings.scale_by_block_size,
        replicas: Replicas | None = None,
    ):
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, l1=l1),
            ZOSettings.from_arguments(locals()),
            replicas,
        )

    def _init_state(self) -> None:
        for seg in self._segments:  # no momentum, no buffer (made at the first step that has momentum)
            if self.param_groups[seg.group_index]["momentum"] != 0:
                self._flat_buffer(seg.flat, seg.buffers, "momentum_buffer")

    def _update(self, c: torch.Tensor, seed: torch.Tensor, estimate: Estimate, finite: torch.Tensor) -> None:
        pending = estimate.pending
        for seg in self._segments:
            group = self.param_groups[seg.group_index]
            buf = seg.buffers.get("momentum_buffer")
            if group["momentum"] != 0 and buf is None:  # momentum switched on after the first step
                buf = self._segment_buffer(seg, "momentum_buffer")
            K.zo_update_(
                seg.data,
                seed,
                self._segment_c(seg, c),
                group["lr"],
                num_directions=self.settings.q,
                weight_decay=group["weight_decay"],
                l1=group["l1"],
                momentum=group["momentum"],
                momentum_buffer=buf,
                restore_scale=-pending.level if pending and seg.master is None else 0.0,
                block_starts=seg.block_starts,
                offset=seg.dir_offset,
                distribution=self.settings.distribution,
                master=seg.master,
                gate=finite,
                backend=self.settings.backend,
                validate_args=False,
                **self._hessian_args(seg, estimate),
            )

    def _hessian_args(self, seg: Segment, estimate: Estimate) -> dict:
        """Extra zo_update_ arguments of a curvature-aware subclass (HiZOO)."""
        return {}
