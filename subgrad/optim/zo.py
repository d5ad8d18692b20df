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
from typing import NamedTuple

import torch

from .. import kernels as K
from ..kernels import step_seed  # noqa: F401 (subgrad.optim.step_seed)
from ..kernels._common import f32, inv_sqrt_rn_torch
from ._counters import StepCounters
from ._layout import FlatOptimizer, Segment, assign_blocks, block_ranges, build_segments

ESTIMATORS = ("central", "forward", "jvp")
BLOCK_MODES = (None, "tensor", "module")


def default_distribution(q: int) -> str:
    """Directions when none is asked for: Rademacher when a step averages several (q > 1: about 4x cheaper
    to draw than Box-Muller normals, and q averages its coarser variance away), gaussian for one."""
    return "rademacher" if q > 1 else "gaussian"


class PendingRestore(NamedTuple):
    """The perturbation a sequential estimate leaves in the weights, ``w0 + level * z(seed + index)`` on
    every block, for the update kernel to take back."""
    index: int  # the direction: seed_index of the step's seed
    level: float


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one step's estimation hands to its update; nothing of it is left on the optimizer."""
    c: torch.Tensor  # [q, blocks] float64 directional-derivative estimates (finite differences)
    loss: torch.Tensor  # the loss the step reports
    losses: torch.Tensor  # every float64 loss the step evaluated (the finite check reads these)
    curvature: torch.Tensor | None = None  # [q, blocks] |L+ + L- - 2 L0| / (2 eps^2), when L0 was evaluated
    pending: PendingRestore | None = None


def _check(name: str, ok: bool, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


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
        _check("eps", isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0, "a finite number > 0", eps)
        _check("q", isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= 2**16, "an int in [1, 65536]", q)
        _check("estimator", self.estimator in ESTIMATORS, f"one of {ESTIMATORS}", self.estimator)
        _check("distribution", self.distribution in K.philox.DISTRIBUTIONS, f"one of {K.philox.DISTRIBUTIONS}",
               self.distribution)
        _check("blocks", blocks in BLOCK_MODES or (isinstance(blocks, int) and not isinstance(blocks, bool)
                                                   and blocks >= 1),
               "None, 'tensor', 'module' or an int block size >= 1", blocks)
        _check("clip", clip is None or (isinstance(clip, (int, float)) and clip > 0), "None or a number > 0", clip)
        _check("seed", isinstance(seed, int) and 0 <= seed < 2**62, "an int in [0, 2**62)", seed)
        _check("backend", self.backend in (None, *K.BACKENDS), f"None or one of {K.BACKENDS}", self.backend)
        object.__setattr__(self, "eps", f32(eps))  # the kernels perturb by the float32 eps: divide by that one
        object.__setattr__(self, "scale_by_block_size", bool(self.scale_by_block_size))


#: The settings a state_dict records and load_state_dict must find equal: every ZOSettings field that
#: changes the numbers.  The seed is state (loaded, not compared); the backend changes no bits.
_SAVED_SETTINGS = tuple(f.name for f in dataclasses.fields(ZOSettings) if f.name not in ("seed", "backend"))


def _refuse_other_settings(saved: dict, current: dict) -> None:
    """One-line refusal of a state saved with other settings (keys a state predates are not compared)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"state_dict was saved with {key}={saved[key]!r} but this optimizer has "
                             f"{key}={value!r}; construct it with the saved settings")


class ZOOptimizer(FlatOptimizer):
    """Shared machinery: packing, directions, estimation, skipping and state.  Subclasses apply the update."""

    #: central differences also evaluate the unperturbed loss L0 (HiZOO: second differences)
    needs_base_loss = False

    def __init__(self, params, defaults: dict, settings: ZOSettings):
        for key in ("lr", "weight_decay", "l1", "momentum"):
            if key in defaults:
                value = defaults[key]
                if key == "lr" and isinstance(value, torch.Tensor):  # read by the kernels at every step
                    _check(key, value.numel() == 1 and value.is_floating_point(), "a number or a 1-element "
                           "floating-point tensor", value)
                    value = float(value)
                _check(key, isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                       "a finite number >= 0", value)
        if defaults.get("momentum", 0) >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {defaults['momentum']}")
        super().__init__(params, defaults)
        self.settings = settings
        self.counters = StepCounters(type(self).__name__)
        self._passes_counted = (0, 0)  # (forward passes, steps) up to the last repack or load
        self._segments: list[Segment] | None = None
        self._packed_for: tuple = ()  # the trainable parameters of each group when packed
        self._flats = []
        self.last_estimate: torch.Tensor | None = None
        #: Callable averaging a step's float64 loss vector over data-parallel ranks (None: one process).
        self.loss_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- layout ------------------------------------------------------------------------------------
    def _param_names(self) -> dict[int, str]:
        names = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                names[id(p)] = group["param_names"][i] if "param_names" in group else None
        return names

    def _pack(self) -> list[Segment]:
        """The segments; rebuilt when the trainable parameters changed (``add_param_group``,
        ``requires_grad`` toggled between steps), every parameter's state carried over."""
        if self._segments is None or self._packed_for != self._trainable():
            names = self._param_names()
            if self.settings.blocks == "module" and any(n is None for n in names.values()):
                raise ValueError("blocks='module' needs parameter names: pass model.named_parameters()")
            devices = {p.device for g in self.param_groups for p in g["params"]}
            if len(devices) > 1:
                raise ValueError(f"params are on several devices {sorted(map(str, devices))}; a zeroth-order "
                                 "step perturbs them with one direction, so move the model to one device")
            if self._segments is not None:  # passes so far were counted at the old number of blocks
                self._passes_counted = (self.forward_passes, self.counters.steps_taken())
            self._flats, self._segments = build_segments(self.param_groups, self.settings.master_weights)
            ranges, self.num_blocks = block_ranges(self._segments, self.settings.blocks, names)
            assign_blocks(self._segments, ranges)
            sizes = torch.zeros(self.num_blocks, dtype=torch.float64)
            for a, b, bid in ranges:
                sizes[bid] += b - a
            # Step-size rule for blocks: the variance of a block's estimate grows with its size d_B, and the
            # stable step of ZO-SGD on it scales like 1 / (d_B + 2); relative to one block over all d.
            device = self._segments[0].data.device
            self._block_scale = ((sizes.sum() + 2) / (sizes + 2)).to(device)
            self.counters.on(device)
            self._init_state()
            self._packed_for = self._trainable()
            self._adopt_state((seg.flat, seg.buffers) for seg in self._segments)  # state from before a repack
            for seg in self._segments:
                self._bind_state(seg)
        for flat in self._flats:
            flat.check()
        return self._segments

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

    # -- perturbation helpers ----------------------------------------------------------------------
    def _move_block(self, block: int | None, seed: torch.Tensor, index: int, level: float, to: float) -> None:
        """Move one block (None: everything) from ``w0 + level z`` to ``w0 + to z``, ``z`` the direction of
        seed ``seed + index`` (``seed`` on the device, read by the kernel).

        Segments with an fp32 master are rewritten from it (``to == 0`` is an exact copy); the others
        are shifted in place by ``(to - level) z``.
        """
        for seg in self._segments:
            for a, b, bid in seg.pieces:
                if block is not None and bid != block:
                    continue
                x = seg.data[a:b]
                h = seg.buffers.get("hessian")
                h = h[a:b] if h is not None else None
                if seg.master is not None and to == 0.0:
                    x.copy_(seg.master[a:b])
                elif seg.master is not None:
                    K.perturb_(x, seed, to, self.settings.backend, offset=seg.dir_offset + a,
                               distribution=self.settings.distribution, source=seg.master[a:b], precond=h,
                               seed_index=index)
                else:
                    K.perturb_(x, seed, to - level, self.settings.backend, offset=seg.dir_offset + a,
                               distribution=self.settings.distribution, precond=h, seed_index=index)

    # -- estimation --------------------------------------------------------------------------------
    def _evaluate(self, closure) -> torch.Tensor:
        with torch.no_grad():
            loss = closure()
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=torch.float64)
        return loss.detach().reshape(()).to(torch.float64)

    def _estimate_sequential(self, closure, seed: torch.Tensor) -> Estimate:
        """Finite differences by in-place perturbation; the last perturbation stays in the weights (pending).

        Losses are collected in the batched path's order ([L0], then per direction and block L+ [, L-]) and
        turned into scalars by :meth:`_scalars`, so both paths share the arithmetic and the reduction hook.
        """
        q, nb, eps = self.settings.q, self.num_blocks, self.settings.eps
        blocks = [None] if nb == 1 else list(range(nb))
        central = self.settings.estimator == "central"
        with_base = not central or self.needs_base_loss
        losses, pending = [self._evaluate(closure)] if with_base else [], None
        for k in range(q):
            for b in blocks:
                self._move_block(b, seed, k, 0.0, eps)
                losses.append(self._evaluate(closure))
                level = eps
                if central:
                    self._move_block(b, seed, k, eps, -eps)
                    level = -eps
                    losses.append(self._evaluate(closure))
                if k == q - 1 and b is None:
                    pending = PendingRestore(k, level)  # the update kernel restores it (skipped step or not)
                else:
                    self._move_block(b, seed, k, level, 0.0)
        return dataclasses.replace(self._scalars(torch.stack(losses), with_base), pending=pending)

    def _scalars(self, losses: torch.Tensor, with_base: bool) -> Estimate:
        """The estimate from the float64 losses of one step ([L0], then per direction and block L+ [, L-]).

        ``loss_reduce`` (set by distributed training) first averages the vector over the ranks: each rank
        evaluated the same points on its own shard of the batch, so this one collective of 2q (+1) floats
        per step is all the communication a zeroth-order step needs.
        """
        if self.loss_reduce is not None:
            losses = self.loss_reduce(losses)
        curvature = None
        if self.settings.estimator == "central":
            pairs = losses[int(with_base):].reshape(-1, 2)
            c, loss = (pairs[:, 0] - pairs[:, 1]) / (2 * self.settings.eps), pairs.mean()
            if with_base:
                loss = losses[0]
                eps = self.settings.eps
                curvature = ((pairs[:, 0] + pairs[:, 1] - 2 * losses[0]).abs() / (2 * eps * eps)
                             ).reshape(self.settings.q, self.num_blocks)
        else:
            c, loss = (losses[1:] - losses[0]) / self.settings.eps, losses[0]
        return Estimate(c.reshape(self.settings.q, self.num_blocks), loss, losses, curvature)

    def _points(self, seed: torch.Tensor):
        """Direction-space perturbations of every point a step evaluates, as one [P, total] fp32 tensor."""
        segs = self._segments
        total = sum(s.numel for s in segs)
        device = segs[0].data.device
        ranges = [(seg.dir_offset + a, seg.dir_offset + b, bid) for seg in segs for a, b, bid in seg.pieces]
        signs = (1.0, -1.0) if self.settings.estimator == "central" else (1.0,)
        masks = torch.zeros(self.num_blocks, total, dtype=torch.bool, device=device)
        for a, e, bid in ranges:
            masks[bid, a:e] = True
        hessians = [seg.buffers.get("hessian") for seg in segs]
        scale = (torch.cat([inv_sqrt_rn_torch(h) for h in hessians])
                 if all(h is not None for h in hessians) else None)
        rows = []
        for k in range(self.settings.q):
            z = (K.philox_rademacher if self.settings.distribution == "rademacher" else K.philox_normal)(
                seed, total, device=device, backend=self.settings.backend, seed_index=k)
            if scale is not None:
                z = z * scale
            for mask in masks:
                for sign in signs:
                    rows.append(torch.where(mask, z * (sign * self.settings.eps), 0.0))
        return torch.stack(rows)

    def _named_views(self, flat_rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split [P, total] direction-space rows into {name: [P, *shape]} tensors of the params' dtypes."""
        names = self._param_names()
        if any(n is None for n in names.values()):
            raise ValueError("functional_closure needs parameter names: pass model.named_parameters()")
        out = {}
        for seg in self._segments:
            for p, off in zip(seg.flat.params, seg.flat.offsets):
                a = seg.dir_offset + off
                out[names[id(p)]] = flat_rows[:, a:a + p.numel()].reshape(-1, *p.shape).to(p.dtype)
        return out

    def _base_rows(self) -> torch.Tensor:
        return torch.cat([(seg.master if seg.master is not None else seg.data).to(torch.float32)
                          for seg in self._segments])

    def _estimate_batched(self, functional_closure, seed: torch.Tensor) -> Estimate:
        """All perturbed points in one vmap call; the weights are never perturbed in place."""
        base = self._base_rows()[None]
        rows = base + self._points(seed)
        with_base = self.settings.estimator == "forward" or self.needs_base_loss
        if with_base:
            rows = torch.cat([base, rows])
        with torch.no_grad():
            losses = torch.func.vmap(functional_closure)(self._named_views(rows))
        losses = losses.detach().reshape(-1).to(torch.float64)
        return self._scalars(losses, with_base)

    def _estimate_jvp(self, functional_closure, seed: torch.Tensor) -> Estimate:
        """Exact directional derivatives along the same directions (torch.func.jvp)."""
        base = self._base_rows()
        tangents = self._points(seed) / self.settings.eps  # one row per (k, block): z_k restricted to the block

        def loss_of(flat):
            return functional_closure({k: v[0] for k, v in self._named_views(flat[None]).items()})

        cs = []
        with torch.no_grad():
            for t in tangents:
                loss, d = torch.func.jvp(loss_of, (base,), (t,))
                cs.append(d.reshape(()).to(torch.float64))
        values = torch.cat([loss.detach().reshape(1).to(torch.float64), torch.stack(cs)])
        if self.loss_reduce is not None:  # [L0, derivatives]: averaged over ranks like the losses
            values = self.loss_reduce(values)
        return Estimate(values[1:].reshape(self.settings.q, self.num_blocks), values[0], values[:1])

    # -- the step ----------------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *,
             functional_closure: Callable[[dict], torch.Tensor] | None = None):
        """One zeroth-order step.  ``closure()`` returns the loss at the current weights (no backward);
        ``functional_closure(params)`` returns the loss for a dict of parameters and enables batched
        evaluation (required for ``estimator="jvp"``).  Returns the loss (mean of all evaluations for
        central differences, the unperturbed loss otherwise)."""
        if closure is None and functional_closure is None:
            raise ValueError("zeroth-order optimizers need closure() (or functional_closure) to evaluate the loss")
        if self.settings.estimator == "jvp" and functional_closure is None:
            raise ValueError("estimator='jvp' needs functional_closure(params) for torch.func.jvp")
        self._pack()
        seed = self.counters.advance(self.settings.seed, self.settings.backend)
        if self.settings.estimator == "jvp":
            estimate = self._estimate_jvp(functional_closure, seed)
        elif functional_closure is not None:
            estimate = self._estimate_batched(functional_closure, seed)
        else:
            estimate = self._estimate_sequential(closure, seed)
        finite = torch.isfinite(estimate.losses).all()  # decided on the device: the kernels read it
        self.counters.count_skip(finite)
        c = self.last_estimate = estimate.c  # [q, blocks] scalars (before clipping), on the loss device
        if self.settings.clip is not None:
            c = c.clamp(-self.settings.clip, self.settings.clip)
        if self.settings.scale_by_block_size:
            c = c * self._block_scale
        self._update((c / self.settings.q).to(torch.float32), seed, estimate, finite.reshape(1))
        return estimate.loss

    def _passes_per_step(self) -> int:
        """Forward passes (closure calls, or jvp evaluations) one step makes at the current packing."""
        directions = self.settings.q * self.num_blocks
        if self.settings.estimator == "jvp":
            return directions
        central = self.settings.estimator == "central"
        return int(not central or self.needs_base_loss) + directions * (2 if central else 1)

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
        return passes if taken == steps else passes + (taken - steps) * self._passes_per_step()

    def _update(self, c: torch.Tensor, seed: torch.Tensor, estimate: Estimate, finite: torch.Tensor) -> None:
        """Apply the step where ``finite`` (a device bool) holds, else only restore the weights: ``c``
        [q, blocks] float32 are the scalars after clipping, block scaling and 1/q, ``seed`` the step's
        first direction seed; ``estimate`` carries the pending restore and the curvature."""
        raise NotImplementedError

    @staticmethod
    def _segment_c(seg: Segment, c: torch.Tensor) -> torch.Tensor:
        """This segment's [q, pieces] scalars, flattened direction-major, on its device."""
        return c.to(seg.data.device)[:, seg.block_ids].reshape(-1)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's layout (``state`` per parameter index, ``param_groups``) plus ``subgrad``: the
        seed, the step counter and the settings, so a resumed run draws the same directions."""
        self._pack()
        state_dict = super().state_dict()
        settings = self.settings
        steps, skipped = self.counters.values()
        state_dict["subgrad"] = dict(kind=type(self).__name__, seed=settings.seed, step=steps,
                                     skipped=skipped, forward_passes=self.forward_passes,
                                     **{key: getattr(settings, key) for key in _SAVED_SETTINGS})
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict` of the same optimizer class and settings; values are
        copied into the flat buffers bit for bit (no dtype casts: the state is fp32 for every param dtype,
        where torch.optim would cast it to the parameter's)."""
        meta = state_dict.get("subgrad")
        if not isinstance(meta, dict) or meta.get("kind") != type(self).__name__:
            raise ValueError(f"not a {type(self).__name__} state_dict (missing or different 'subgrad' entry)")
        _refuse_other_settings(meta, {key: getattr(self.settings, key) for key in _SAVED_SETTINGS})
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(len(a["params"]) != len(b["params"])
                                                        for a, b in zip(groups, self.param_groups)):
            raise ValueError("state_dict has a different number of param groups or parameters than this optimizer")
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for seg in self._pack():
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
        lr: learning rate (>= 0).
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
        scale_by_block_size: with blocks, multiply block b's scalar by ``(d + 2) / (d_b + 2)`` (d parameters
            in all, d_b in the block): the stable ZO-SGD step of a block scales like ``1 / (d_b + 2)``, so
            small blocks (biases, the last layer) take proportionally larger steps at the same ``lr``.
    """

    _buffer_keys = ("master", "momentum_buffer")

    def __init__(self, params, lr: float, eps: float = ZOSettings.eps, q: int = ZOSettings.q,
                 estimator: str = ZOSettings.estimator, distribution: str | None = ZOSettings.distribution,
                 blocks=ZOSettings.blocks, momentum: float = 0.0, weight_decay: float = 0.0, l1: float = 0.0,
                 clip: float | None = ZOSettings.clip, seed: int = ZOSettings.seed,
                 backend: str | None = ZOSettings.backend, master_weights: bool | None = ZOSettings.master_weights,
                 scale_by_block_size: bool = ZOSettings.scale_by_block_size):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, l1=l1),
                         ZOSettings.from_arguments(locals()))

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
            K.zo_update_(seg.data, seed, self._segment_c(seg, c), group["lr"], num_directions=self.settings.q,
                         weight_decay=group["weight_decay"], l1=group["l1"], momentum=group["momentum"],
                         momentum_buffer=buf,
                         restore_scale=-pending.level if pending and seg.master is None else 0.0,
                         block_starts=seg.block_starts, offset=seg.dir_offset, distribution=self.settings.distribution,
                         master=seg.master, gate=finite, backend=self.settings.backend,
                         **self._hessian_args(seg, estimate))

    def _hessian_args(self, seg: Segment, estimate: Estimate) -> dict:
        """Extra zo_update_ arguments of a curvature-aware subclass (HiZOO)."""
        return {}


class ZOAdam(ZOOptimizer):
    """Adam(W) moments on the zeroth-order gradient estimate ``g = sum_k c_k z_k / q``.

    Same estimation arguments as :class:`ZOSGD`; ``betas``, ``adam_eps`` and decoupled ``weight_decay``
    as in ``torch.optim.AdamW``.  Memory: three float32 buffers the size of the model (first and
    second moments, and the materialised estimate the Adam kernel reads), plus the fp32 master copy for
    half-precision parameters; ZOSGD without momentum needs none.
    """

    _buffer_keys = ("master", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, eps: float = ZOSettings.eps, q: int = ZOSettings.q,
                 estimator: str = ZOSettings.estimator, distribution: str | None = ZOSettings.distribution,
                 blocks=ZOSettings.blocks, betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 weight_decay: float = 0.0, l1: float = 0.0, clip: float | None = ZOSettings.clip,
                 seed: int = ZOSettings.seed, backend: str | None = ZOSettings.backend,
                 master_weights: bool | None = ZOSettings.master_weights,
                 scale_by_block_size: bool = ZOSettings.scale_by_block_size):
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        _check("adam_eps", isinstance(adam_eps, (int, float)) and adam_eps > 0, "a number > 0", adam_eps)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), adam_eps=adam_eps, weight_decay=weight_decay, l1=l1),
                         ZOSettings.from_arguments(locals()))

    def _init_state(self) -> None:
        for seg in self._segments:
            for key in ("exp_avg", "exp_avg_sq"):
                self._flat_buffer(seg.flat, seg.buffers, key)

    def _update(self, c: torch.Tensor, seed: torch.Tensor, estimate: Estimate, finite: torch.Tensor) -> None:
        if estimate.pending is not None:
            self._move_block(None, seed, estimate.pending.index, estimate.pending.level, 0.0)
        scratch = None
        for seg in self._segments:
            group = self.param_groups[seg.group_index]
            if scratch is None or scratch.numel() < seg.numel:
                scratch = torch.empty(seg.numel, dtype=torch.float32, device=seg.data.device)
            g = K.zo_estimate_(scratch[:seg.numel], seed, self._segment_c(seg, c), num_directions=self.settings.q,
                               block_starts=seg.block_starts, offset=seg.dir_offset,
                               distribution=self.settings.distribution, backend=self.settings.backend)
            weights = seg.master if seg.master is not None else seg.data
            beta1, beta2 = group["betas"]
            K.adamw_step_(weights, g, seg.buffers["exp_avg"], seg.buffers["exp_avg_sq"], step=self.counters.steps,
                          lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["adam_eps"],
                          weight_decay=group["weight_decay"], l1=group["l1"], backend=self.settings.backend)
            if seg.master is not None:
                seg.data.copy_(seg.master)


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

    def __init__(self, params, lr: float, eps: float = ZOSettings.eps, q: int = ZOSettings.q,
                 distribution: str | None = ZOSettings.distribution, blocks=ZOSettings.blocks, momentum: float = 0.0,
                 weight_decay: float = 0.0, l1: float = 0.0, clip: float | None = ZOSettings.clip,
                 hessian_smoothing: float = 1e-3, hessian_min: float = 1e-4, seed: int = ZOSettings.seed,
                 backend: str | None = ZOSettings.backend, master_weights: bool | None = ZOSettings.master_weights,
                 scale_by_block_size: bool = ZOSettings.scale_by_block_size):
        _check("hessian_smoothing", isinstance(hessian_smoothing, (int, float)) and 0 <= hessian_smoothing <= 1,
               "a number in [0, 1]", hessian_smoothing)
        _check("hessian_min", isinstance(hessian_min, (int, float)) and hessian_min > 0, "a number > 0", hessian_min)
        ZOOptimizer.__init__(self, params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, l1=l1),
                             ZOSettings.from_arguments(locals(), estimator="central"))
        self.hessian_smoothing, self.hessian_min = hessian_smoothing, hessian_min

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["subgrad"].update(hessian_smoothing=self.hessian_smoothing, hessian_min=self.hessian_min)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        meta = state_dict.get("subgrad")
        if isinstance(meta, dict):
            _refuse_other_settings(meta, dict(hessian_smoothing=self.hessian_smoothing, hessian_min=self.hessian_min))
        super().load_state_dict(state_dict)

    def _init_state(self) -> None:
        super()._init_state()
        for seg in self._segments:
            self._flat_buffer(seg.flat, seg.buffers, "hessian", fill=1.0)  # h = 1: plain directions at first

    def _hessian_args(self, seg: Segment, estimate: Estimate) -> dict:
        return dict(hessian=seg.buffers["hessian"],
                    curvature=self._segment_c(seg, estimate.curvature / self.settings.q),
                    hessian_smoothing=self.hessian_smoothing, hessian_min=self.hessian_min)
