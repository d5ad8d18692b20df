"""Zeroth-order estimation as functions: ``(closure, layout, seed, settings) -> Estimate``.

Each estimator evaluates the loss at seeded perturbations of the packed parameters (``layout``) and
returns the directional-derivative scalars ``c[k, b]`` of direction ``k`` restricted to block ``b``:

* :func:`estimate_sequential`: ``closure()`` at weights perturbed in place, block by block;
  central ``(L+ - L-) / (2 eps)`` or forward ``(L+ - L0) / eps``.  The last perturbation is left in the
  weights (``Estimate.pending``) for the update kernel to take back in its own pass.
* :func:`estimate_batched`: the same points, all in one ``torch.func.vmap`` of ``functional_closure``;
  the weights are never touched.
* :func:`estimate_jvp`: exact directional derivatives along the same directions (``torch.func.jvp``).

``base_loss`` asks central differences for the unperturbed loss ``L0`` too (HiZOO's second
differences, returned as ``Estimate.curvature``); ``reduce`` averages a step's float64 loss vector over
data-parallel ranks (one collective of 2q (+1) floats: all a zeroth-order step sends).  Nothing is
read on the host: the scalars stay on the device for the update kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import kernels as K
from ..kernels._common import inv_sqrt_rn_torch
from .zo_layout import ZOLayout
from .zo_settings import ZOSettings

Reduce = Callable[[torch.Tensor], torch.Tensor]


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


def passes_per_step(layout: ZOLayout, settings: ZOSettings, base_loss: bool = False) -> int:
    """Forward passes (closure calls, or jvp evaluations) one step makes."""
    directions = settings.q * layout.num_blocks
    if settings.estimator == "jvp":
        return directions
    central = settings.estimator == "central"
    return int(not central or base_loss) + directions * (2 if central else 1)


class BlockMoves:
    """Every piece's perturbation launch, prepared once (:func:`subgrad.kernels.perturb_launcher`) and kept on
    the layout while the seed tensor, the settings, the master copies and the curvature buffers they bind
    stay the same; a step then moves each block with one launch per piece and no other host work."""

    def __init__(self, layout: ZOLayout, settings: ZOSettings, seed: torch.Tensor):
        self.bound = BlockMoves.binding(layout, settings, seed)
        self.pieces: dict[int | None, list] = {None: []}  # block id (None: every block) -> its pieces
        for seg in layout.segments:
            h = seg.buffers.get("hessian")
            for a, b, bid in seg.pieces:
                x, master, precond = seg.data[a:b], seg.master, (h[a:b] if h is not None else None)
                common = dict(offset=seg.dir_offset + a, distribution=settings.distribution, precond=precond)
                if master is not None:  # rewritten from the exact fp32 copy: (copy target, copy source, launcher)
                    launch = K.perturb_launcher(x, seed, settings.backend, source=master[a:b], **common)
                    piece = (x, master[a:b], launch)
                else:
                    piece = (None, None, K.perturb_launcher(x, seed, settings.backend, **common))
                self.pieces.setdefault(bid, []).append(piece)
                self.pieces[None].append(piece)

    @staticmethod
    def binding(layout: ZOLayout, settings: ZOSettings, seed: torch.Tensor) -> tuple:
        """What the prepared launches hold or depend on, compared by identity."""
        buffers = tuple(seg.buffers.get(key) for seg in layout.segments for key in ("master", "hessian"))
        return (_launch_epoch(), settings.backend, settings.distribution, seed, *buffers)

    @staticmethod
    def of(layout: ZOLayout, settings: ZOSettings, seed: torch.Tensor) -> BlockMoves:
        """The layout's prepared moves, rebuilt when anything they bind changed."""
        moves = layout.prepared.get("moves")
        if moves is None or not _same(moves.bound, BlockMoves.binding(layout, settings, seed)):
            moves = layout.prepared["moves"] = BlockMoves(layout, settings, seed)
        return moves

    def move(self, block: int | None, index: int, level: float, to: float) -> None:
        """Move ``block`` (None: everything) from ``w0 + level z`` to ``w0 + to z`` along direction ``index``:
        pieces with an fp32 master are rewritten from it (``to == 0``: an exact copy), the others shifted in
        place by ``(to - level) z``."""
        for x, master, launch in self.pieces.get(block, ()):
            if master is None:
                launch(to - level, index)
            elif to == 0.0:
                x.copy_(master)
            else:
                launch(to, index)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(u is v or (not isinstance(u, torch.Tensor) and u == v) for u, v in zip(a, b))


def _launch_epoch() -> int:
    return K._common.launch_epoch  # bumped when subgrad.testing's recorder swaps the kernels


def move_block(
    layout: ZOLayout, settings: ZOSettings, block: int | None, seed: torch.Tensor, index: int, level: float, to: float
) -> None:
    """Move one block (None: everything) from ``w0 + level z`` to ``w0 + to z``, ``z`` the direction of
    seed ``seed + index`` (``seed`` on the device, read by the kernel); see :meth:`BlockMoves.move`."""
    BlockMoves.of(layout, settings, seed).move(block, index, level, to)


def _loss_of(closure) -> torch.Tensor:
    """The closure's loss as a float64 copy (a closure may return one buffer it overwrites, as a replayed
    graph's output is); a Python number becomes a float64 tensor.  Called under no_grad."""
    loss = closure()
    if not isinstance(loss, torch.Tensor):
        return torch.tensor(float(loss), dtype=torch.float64)
    return loss.to(torch.float64, copy=True)


def _loss_vector(losses: list[torch.Tensor]) -> torch.Tensor:
    """One step's 1-element float64 losses as one vector."""
    if all(loss.dim() == 0 for loss in losses):
        return torch.stack(losses)
    return torch.cat([loss.reshape(1) for loss in losses])


def estimate_sequential(
    closure: Callable[[], torch.Tensor],
    layout: ZOLayout,
    seed: torch.Tensor,
    settings: ZOSettings,
    *,
    base_loss: bool = False,
    reduce: Reduce | None = None,
) -> Estimate:
    """Finite differences by in-place perturbation; the last perturbation stays in the weights (pending).

    Losses are collected in the batched estimator's order ([L0], then per direction and block L+ [, L-])
    and turned into scalars by :func:`scalars`, so both estimators share the arithmetic.
    """
    q, eps = settings.q, settings.eps
    blocks = [None] if layout.num_blocks == 1 else list(range(layout.num_blocks))
    central = settings.estimator == "central"
    with_base = not central or base_loss
    moves, pending = BlockMoves.of(layout, settings, seed), None
    with torch.no_grad():
        losses = [_loss_of(closure)] if with_base else []
        for k in range(q):
            for b in blocks:
                moves.move(b, k, 0.0, eps)
                losses.append(_loss_of(closure))
                level = eps
                if central:
                    moves.move(b, k, eps, -eps)
                    level = -eps
                    losses.append(_loss_of(closure))
                if k == q - 1 and b is None:
                    pending = PendingRestore(k, level)  # the update kernel restores it (skipped step or not)
                else:
                    moves.move(b, k, level, 0.0)
    estimate = scalars(_loss_vector(losses), layout, settings, with_base=with_base, reduce=reduce)
    return dataclasses.replace(estimate, pending=pending)


def scalars(
    losses: torch.Tensor, layout: ZOLayout, settings: ZOSettings, *, with_base: bool, reduce: Reduce | None = None
) -> Estimate:
    """The estimate from the float64 losses of one step ([L0], then per direction and block L+ [, L-]),
    averaged over ranks first when ``reduce`` is given (each rank evaluated the same points on its shard)."""
    if reduce is not None:
        losses = reduce(losses)
    q, nb, eps = settings.q, layout.num_blocks, settings.eps
    curvature = None
    if settings.estimator == "central":
        pairs = losses[int(with_base) :].reshape(-1, 2)
        c = (pairs[:, 0] - pairs[:, 1]) / (2 * eps)
        if not with_base:
            loss = pairs.mean()
        else:
            loss = losses[0]
            curvature = ((pairs[:, 0] + pairs[:, 1] - 2 * losses[0]).abs() / (2 * eps * eps)).reshape(q, nb)
    else:
        c, loss = (losses[1:] - losses[0]) / eps, losses[0]
    return Estimate(c.reshape(q, nb), loss, losses, curvature)


def points(layout: ZOLayout, seed: torch.Tensor, settings: ZOSettings) -> torch.Tensor:
    """Direction-space perturbations of every point a step evaluates, as one [P, total] fp32 tensor."""
    segs, total, device = layout.segments, layout.total, layout.device
    signs = (1.0, -1.0) if settings.estimator == "central" else (1.0,)
    masks = torch.zeros(layout.num_blocks, total, dtype=torch.bool, device=device)
    for seg in segs:
        for a, e, bid in seg.pieces:
            masks[bid, seg.dir_offset + a : seg.dir_offset + e] = True
    hessians = [seg.buffers.get("hessian") for seg in segs]
    scale = torch.cat([inv_sqrt_rn_torch(h) for h in hessians]) if all(h is not None for h in hessians) else None
    draw = K.philox_rademacher if settings.distribution == "rademacher" else K.philox_normal
    rows = []
    for k in range(settings.q):
        z = draw(seed, total, device=device, backend=settings.backend, seed_index=k)
        if scale is not None:
            z = z * scale
        for mask in masks:
            for sign in signs:
                rows.append(torch.where(mask, z * (sign * settings.eps), 0.0))
    return torch.stack(rows)


def named_views(layout: ZOLayout, flat_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split [P, total] direction-space rows into {name: [P, *shape]} tensors of the params' dtypes."""
    if any(n is None for n in layout.names.values()):
        raise ValueError("functional_closure needs parameter names: pass model.named_parameters()")
    out = {}
    for seg in layout.segments:
        for p, off in zip(seg.flat.params, seg.flat.offsets):
            a = seg.dir_offset + off
            out[layout.names[id(p)]] = flat_rows[:, a : a + p.numel()].reshape(-1, *p.shape).to(p.dtype)
    return out


def base_point(layout: ZOLayout) -> torch.Tensor:
    """The unperturbed weights in direction space (fp32; from the master copy where there is one)."""
    return torch.cat(
        [(seg.master if seg.master is not None else seg.data).to(torch.float32) for seg in layout.segments]
    )


def estimate_batched(
    functional_closure: Callable[[dict], torch.Tensor],
    layout: ZOLayout,
    seed: torch.Tensor,
    settings: ZOSettings,
    *,
    base_loss: bool = False,
    reduce: Reduce | None = None,
) -> Estimate:
    """All perturbed points in one vmap call; the weights are never perturbed in place."""
    base = base_point(layout)[None]
    rows = base + points(layout, seed, settings)
    with_base = settings.estimator == "forward" or base_loss
    if with_base:
        rows = torch.cat([base, rows])
    with torch.no_grad():
        losses = torch.func.vmap(functional_closure)(named_views(layout, rows))
    losses = losses.detach().reshape(-1).to(torch.float64)
    return scalars(losses, layout, settings, with_base=with_base, reduce=reduce)


def estimate_jvp(
    functional_closure: Callable[[dict], torch.Tensor],
    layout: ZOLayout,
    seed: torch.Tensor,
    settings: ZOSettings,
    *,
    reduce: Reduce | None = None,
) -> Estimate:
    """Exact directional derivatives along the same directions (torch.func.jvp)."""
    base = base_point(layout)
    tangents = points(layout, seed, settings) / settings.eps  # one row per (k, block): z_k restricted to the block

    def loss_of(flat):
        return functional_closure({k: v[0] for k, v in named_views(layout, flat[None]).items()})

    derivatives = []
    with torch.no_grad():
        for t in tangents:
            loss, d = torch.func.jvp(loss_of, (base,), (t,))
            derivatives.append(d.reshape(()).to(torch.float64))
    values = torch.cat([loss.detach().reshape(1).to(torch.float64), torch.stack(derivatives)])
    if reduce is not None:  # [L0, derivatives]: averaged over ranks like the losses
        values = reduce(values)
    return Estimate(values[1:].reshape(settings.q, layout.num_blocks), values[0], values[:1])
