"""Per-example activity perturbation (``subgrad.optim.ActivityZO``): the two element-wise passes of a step,
with the direction regenerated from its seed in each, never stored.

A site's activity ``z`` is ``[n, m]`` (n examples of m units, contiguous), and direction ``k`` of the site
is the Rademacher direction named by ``seed + seed_index`` from element ``k S`` on, ``S`` = n m rounded up
to a whole Philox group of 4096 (``u_k[i, j] = s(k S + i m + j)``, the map of
:func:`subgrad.kernels.philox_rademacher`; every direction starts on a group boundary, so a kernel tile
draws each of its directions' signs as one group), times the site's mask ``active`` (0 on units that
cannot move the loss).

* :func:`perturb_activity` -- the perturbed activity of examples ``rows``, one pass::

      out[i, j] = z[i, j] + eps * (s_k(i, j) * active[i, j])

* :func:`activity_gradient` -- the estimated gradient of the site, one pass over q directions::

      g[i, j] = (sum over k = 0 .. q-1, in order, of d[k, part[j], i] * s_k(i, j)) * scale * active[i, j]

  ``d[k, p, i]``: the loss difference of example i's part p under direction k (``part[j]``: the part unit
  j moves; parts = 1 when every unit moves the whole loss), ``scale = 1 / (q n)``.

Both twins do the same float32 operations in the same order (products with a sign or a 0/1 mask are
exact), so kernel and twin agree bit for bit.  What the fusion saves on a GPU: the q direction tensors of a
site (q n m floats written and read again), one launch per direction and the mask and scale passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INPLACE_CHUNK, check_contiguous, check_direction_range, chunks, f32, require, resolve_backend
from .philox import (
    RADEMACHER_DIRECTION_CHUNK,
    direction_tile,
    group_size,
    iter_direction_chunks,
    kernel_seed,
    seed_args,
    seed_value,
    tile_launch,
    tile_positions,
)

GROUP = group_size(True)  # elements per Rademacher group (32 Philox calls)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "seed_index", "first_group"])
def perturb_activity_kernel(
    out_ptr,  # *fp32 [count]: the perturbed activity of the rows
    z_ptr,  # *fp32 [count]: the clean activity of the same rows
    active_ptr,  # *i1 [count]: 1 where a unit can move the loss (HAS_ACTIVE), else unused
    seed_ptr,  # *int64 [1]: the seed when SEED_IN_MEMORY (else unused)
    count,  # elements of the rows: rows x m
    seed_lo,  # low 31 bits of a host seed
    seed_hi,  # seed >> 31 of a host seed
    seed_index,  # added to the seed (the site)
    first_group,  # offset // GROUP: Philox group of element 0 (offset = k S + first row x m)
    lead,  # offset % GROUP: position of element 0 within its group
    eps,  # fp32 perturbation size
    HAS_ACTIVE: tl.constexpr,  # multiply the direction by the mask
    SEED_IN_MEMORY: tl.constexpr,  # read the seed from seed_ptr (replayable launches)
    GROUP: tl.constexpr,  # 4096 elements per Rademacher group (32 Philox calls)
    TILE_SIZE: tl.constexpr,  # elements per program (= GROUP)
    WIDE: tl.constexpr,  # int64 element indices
):
    """out = z + eps * (s * active)."""
    pos, group = tile_positions(first_group, lead, GROUP, TILE_SIZE, WIDE)
    mask = (pos >= 0) & (pos < count)
    s = direction_tile(kernel_seed(seed_ptr, seed_lo, seed_hi, seed_index, SEED_IN_MEMORY), group, TILE_SIZE, True)
    if HAS_ACTIVE:
        s = s * tl.load(active_ptr + pos, mask=mask, other=0).to(tl.float32)
    z = tl.load(z_ptr + pos, mask=mask)
    tl.store(out_ptr + pos, z + eps * s, mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "seed_index", "q"])
def activity_gradient_kernel(
    g_ptr,  # *fp32 [n m]: the site's estimated gradient (written)
    d_ptr,  # *fp32 [q, parts, n]: per-direction, per-part, per-example loss differences
    part_ptr,  # *int64 [m]: the part each unit moves (HAS_PARTS), else unused
    active_ptr,  # *i1 [n m]: the mask (HAS_ACTIVE), else unused
    seed_ptr,  # *int64 [1]: the seed when SEED_IN_MEMORY (else unused)
    total,  # n m
    m,  # units per example
    n,  # examples
    parts,  # parts of the local loss (d's middle dimension)
    q,  # directions
    groups_per_direction,  # stride // GROUP: direction k starts at group k * groups_per_direction
    seed_lo,  # low 31 bits of a host seed
    seed_hi,  # seed >> 31 of a host seed
    seed_index,  # added to the seed (the site)
    scale,  # fp32: 1 / (q n)
    HAS_PARTS: tl.constexpr,  # read part[j]; else every unit reads part 0
    HAS_ACTIVE: tl.constexpr,  # multiply by the mask
    SEED_IN_MEMORY: tl.constexpr,  # read the seed from seed_ptr (replayable launches)
    GROUP: tl.constexpr,  # 4096 elements per Rademacher group (32 Philox calls)
    TILE_SIZE: tl.constexpr,  # elements per program (= GROUP)
    WIDE: tl.constexpr,  # int64 element indices
):
    """g = (sum_k d[k, part[j], i] * s_k) * scale * active, k in order: each direction starts on a group
    boundary, so program p's tile of every direction is one whole group, drawn once per direction."""
    pos, group = tile_positions(0, 0, GROUP, TILE_SIZE, WIDE)
    mask = pos < total
    example = pos // m
    if HAS_PARTS:
        row = tl.load(part_ptr + pos % m, mask=mask, other=0) * n + example
    else:
        row = example
    seed = kernel_seed(seed_ptr, seed_lo, seed_hi, seed_index, SEED_IN_MEMORY)
    acc = tl.zeros([TILE_SIZE // 128, 128], dtype=tl.float32)
    for k in range(q):
        d = tl.load(d_ptr + k * parts * n + row, mask=mask, other=0.0)
        acc = acc + d * direction_tile(seed, group + k * groups_per_direction, TILE_SIZE, True)
    g = acc * scale
    if HAS_ACTIVE:
        g = g * tl.load(active_ptr + pos, mask=mask, other=0).to(tl.float32)
    tl.store(g_ptr + pos, g, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers and twins
# --------------------------------------------------------------------------------------------------
def direction_stride(total: int) -> int:
    """Elements between the starts of a site's consecutive directions: ``total`` rounded up to a whole
    Rademacher group, so every direction starts on a group boundary."""
    return -(-total // GROUP) * GROUP


def takes_twin(backend: str | None, like: torch.Tensor) -> bool:
    """Whether the activity ops run their torch twins for ``backend`` on tensors like ``like``: the twins
    read a site's directions drawn once (:func:`site_signs`), the kernels regenerate them.  The same
    backend choice as the ops' own, so a caller that draws the signs agrees with them (also when
    :func:`subgrad.testing.triton_launches` forces the Triton path)."""
    return resolve_backend(backend, like) == "torch"


def site_signs(seed: int | torch.Tensor, q: int, total: int, device, seed_index: int = 0) -> torch.Tensor:
    """The first q directions of a site of ``total`` units (all examples), ``[q, stride]`` int8 signs
    (direction k is row k; elements past ``total`` are the padding to a group boundary), drawn in one
    call: what the twins read, so a CPU step draws each direction once.  int8 (±1 exactly), filled a chunk
    at a time: a quarter of float32's memory, which a CPU step holds for every site of a block."""
    stride = direction_stride(total)
    signs = torch.empty(q * stride, dtype=torch.int8, device=device)
    chunks_of = iter_direction_chunks(
        seed_value(seed, seed_index), 0, q * stride, device, True, RADEMACHER_DIRECTION_CHUNK
    )
    for start, stop, chunk in chunks_of:
        signs[start:stop] = chunk
    return signs.view(q, stride)


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int, like: torch.Tensor) -> None:
    require(
        name,
        t.dtype == dtype and t.numel() == numel and t.device == like.device,
        f"{dtype} with {numel} elements on {like.device}",
        f"{t.dtype} {tuple(t.shape)} on {t.device}",
    )
    check_contiguous(name, t)


def perturb_activity(
    z: torch.Tensor,
    active: torch.Tensor | None,
    seed: int | torch.Tensor,
    k: int,
    rows: slice,
    eps: float,
    backend: str | None = None,
    *,
    seed_index: int = 0,
    signs: torch.Tensor | None = None,
    validate_args: bool = True,
) -> torch.Tensor:
    """Rows ``rows`` of ``z + eps * u_k`` (a new tensor like ``z[rows]``), ``u_k = s_k * active``: direction
    ``k`` of the site named by ``seed + seed_index`` (map in the module docstring).

    Args:
        z: ``[n, ...]`` contiguous float32 activity (all n examples; ``rows`` picks this rank's share).
        active: bool like ``z``, or None (every unit).
        seed: an int in [0, 2**62) or a 1-element int64 tensor on ``z``'s device.
        k: the direction, >= 0.
        rows: a slice of the batch with step 1.
        eps: perturbation size.
        signs: the twin only: the site's directions already drawn (:func:`site_signs`), so a CPU step draws
            them once for its perturbations and its gradient; the kernel regenerates them and refuses this.
    """
    n = z.shape[0]
    start, stop, step = rows.indices(n)
    total, m = z.numel(), z[0].numel() if n else 0
    if validate_args:
        require(
            "z", z.dtype == torch.float32 and z.dim() >= 1, "a float32 tensor [n, ...]", f"{z.dtype} {tuple(z.shape)}"
        )
        check_contiguous("z", z)
        if active is not None:
            _check("active", active, torch.bool, total, z)
        require("k", isinstance(k, int) and not isinstance(k, bool) and k >= 0, "an int >= 0", k)
        require("rows", step == 1, "a slice with step 1", rows)
        check_direction_range(k * direction_stride(total), total)
    offset, count = k * direction_stride(total) + start * m, max(stop - start, 0) * m
    s = seed_args(seed, seed_index, 1, z)
    if not takes_twin(backend, z):
        require("signs", signs is None, "None with the Triton kernel (it draws them)", "a tensor")
        out = torch.empty_like(z[start:stop])
        if count:
            t = tile_launch(offset, count, True)
            zs = z.view(-1)[start * m :]
            acts = active.view(-1)[start * m :] if active is not None else zs
            perturb_activity_kernel[t.grid](
                out,
                zs,
                acts,
                s.tensor if s.tensor is not None else zs,
                count,
                s.lo,
                s.hi,
                s.index,
                t.first_group,
                t.lead,
                f32(eps),
                HAS_ACTIVE=active is not None,
                SEED_IN_MEMORY=s.tensor is not None,
                GROUP=t.group,
                TILE_SIZE=t.tile_size,
                WIDE=t.wide,
                num_warps=t.num_warps,
                enable_fp_fusion=False,
            )
    else:
        if signs is None:
            signs = site_signs(seed, k + 1, total, z.device, seed_index)
        # z + eps * (s * active), built in one buffer: the same float32 operations (a sum commutes exactly)
        u = signs[k, start * m : stop * m].to(torch.float32)
        if active is not None:
            u.mul_(active.view(-1)[start * m : stop * m])
        out = u.mul_(f32(eps)).add_(z.view(-1)[start * m : stop * m]).view_as(z[start:stop])
    return out


def activity_gradient(
    d: torch.Tensor,
    active: torch.Tensor | None,
    parts: torch.Tensor | None,
    seed: int | torch.Tensor,
    shape: torch.Size,
    backend: str | None = None,
    *,
    seed_index: int = 0,
    signs: torch.Tensor | None = None,
    validate_args: bool = True,
) -> torch.Tensor:
    """The site's estimated gradient (float32, ``shape`` = the activity's ``[n, ...]``) from the loss
    differences ``d`` ``[q, parts, n]``: ``(sum_k d[k, part[j], i] * s_k) / (q n) * active`` (module
    docstring), the q directions regenerated from ``seed + seed_index``.

    Args:
        d: contiguous float32 ``[q, parts, n]``.
        active: bool of ``shape``, or None (every unit).
        parts: int64 ``[m]`` (``m`` units per example): the part each unit moves; None: ``d`` has one part.
        signs: as in :func:`perturb_activity` (at least q directions).
    """
    q, n_parts, n = d.shape if d.dim() == 3 else (0, 0, 0)
    total = 1
    for size in shape:
        total *= size
    m = total // n if n else 0
    if validate_args:
        require(
            "d",
            d.dtype == torch.float32 and d.dim() == 3 and d.shape[0] >= 1,
            "float32 [q >= 1, parts, n]",
            f"{d.dtype} {tuple(d.shape)}",
        )
        check_contiguous("d", d)
        require("shape", len(shape) >= 1 and shape[0] == n, f"[n = {n}, ...]", tuple(shape))
        if active is not None:
            _check("active", active, torch.bool, total, d)
        if parts is None:
            require("d", n_parts == 1, "one part when parts is None", tuple(d.shape))
        else:
            _check("parts", parts, torch.int64, m, d)
        check_direction_range((q - 1) * direction_stride(total), total)
    g = torch.empty(shape, dtype=torch.float32, device=d.device)
    scale = f32(1.0 / (q * n)) if n else 0.0
    s = seed_args(seed, seed_index, 1, d)
    if not takes_twin(backend, d):
        require("signs", signs is None, "None with the Triton kernel (it draws them)", "a tensor")
        if total:
            t = tile_launch(0, total, True)
            activity_gradient_kernel[t.grid](
                g,
                d,
                parts if parts is not None else d,
                active if active is not None else g,
                s.tensor if s.tensor is not None else d,
                total,
                m,
                n,
                n_parts,
                q,
                direction_stride(total) // GROUP,
                s.lo,
                s.hi,
                s.index,
                scale,
                HAS_PARTS=parts is not None,
                HAS_ACTIVE=active is not None,
                SEED_IN_MEMORY=s.tensor is not None,
                GROUP=t.group,
                TILE_SIZE=t.tile_size,
                WIDE=t.wide,
                num_warps=t.num_warps,
                enable_fp_fusion=False,
            )
        return g
    if signs is None:
        signs = site_signs(seed, q, total, d.device, seed_index)
    signs = signs[:q, :total].view(q, n, m)
    # the same float32 operations in the same order as the kernel (a product with a sign is exact, so it may
    # be formed in either order), accumulated in g a few rows at a time: temporaries (a part's difference per
    # unit, a converted mask) stay small beside the batch-sized g
    step = max(1, INPLACE_CHUNK // max(m, 1))
    for start, stop in chunks(n, step):
        acc = g.view(n, m)[start:stop]
        for k in range(q):
            # d[k, part[j], i] as [rows, m]: one part per unit, or the only part
            per_unit = d[k, :, start:stop].T[:, parts] if parts is not None else d[k, 0, start:stop][:, None]
            direction = signs[k].view(n, m)[start:stop]
            if k == 0:
                acc.copy_(direction).mul_(per_unit)
            else:
                acc.add_(direction.to(torch.float32).mul_(per_unit))
        acc.mul_(scale)
        if active is not None:
            acc.mul_(active.view(n, m)[start:stop])
    return g
