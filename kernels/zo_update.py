"""Fused zeroth-order update: restore the perturbed buffer and take the step, in one pass.

A central-difference step leaves the weights at ``w - eps z`` after its second forward pass.  This
kernel reads that buffer once and writes it once:

    w  = master                        if an fp32 master copy is kept (exact restore), else
    w  = x + restore_scale * z_last    (restore_scale = +eps undoes the last perturbation)
    g  = sum_k c[k, b(i)] * z_k + weight_decay * w + l1 * sign(w)    (terms with a zero coefficient skipped;
                                       the sum runs k = q-1, 0, 1, ..., q-2 in kernel and twin alike)
    m  = momentum * m + g ;  g = m     (only with a momentum buffer)
    w  = w - lr * g
    x  = cast(w)  (and master = w)

The plain update (one block; no master, momentum, decay, L1 or curvature) folds the restore into the
last direction's step, one coefficient per program instead of three float ops per element:

    w  = x + (restore_scale - lr * c[q-1]) * z_last ;  w = w - lr * (c[k] * z_k)  for k = 0, ..., q-2
    x  = cast(w)

The step may combine ``num_directions`` = q directions with seeds ``seed, seed + 1, ..., seed + q - 1``
(``z_last`` is the last of them): every direction is regenerated in registers, so the memory traffic
is one read and one write whatever q is.  ``c`` holds the finite-difference scalars, one per direction,
or one per direction and block, where block ``b`` covers elements ``block_starts[b] ..
block_starts[b+1]-1``; every block updates in the same launch.  ``c`` and ``block_starts`` may live on
the device, so a step never waits for the host.

With a curvature buffer ``hessian`` (h > 0, HiZOO's diagonal Sigma^-1) the directions are
preconditioned, ``z_k / sqrt(h)``, exactly as :func:`perturb_` applied them, and h is updated in the
same pass from the second differences ``kappa[k, b] = |L+ + L- - 2 L0| / (2 eps^2)``:

    h = max(h * ((1 - alpha) + alpha * sum_k kappa_k z_k^2), hessian_min)

Drift guarantee (tested in ``tests/test_precision.py``): with a master copy the weights seen by the
model after restore are bit-identical to the master rounded once; without one (fp32 in place), each
+eps / -2 eps / +eps cycle adds at most ~3 half-ulp roundings, i.e. a random walk of a few 1e-6
relative over 1,000 steps at lr = 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    check_contiguous,
    check_direction_range,
    check_float_dtype,
    check_gate,
    check_nonnegative,
    check_same_layout,
    chunks,
    device_scalar,
    f32,
    gate_open,
    host_scalar,
    inv_sqrt_rn,
    inv_sqrt_rn_torch,
    resolve_backend,
    round_to,
    sign,
)
from .philox import (
    direction_tile,
    direction_torch,
    is_rademacher,
    kernel_seed,
    seed_args,
    seed_value,
    tile_launch,
    tile_positions,
    twin_chunk,
)


@triton.jit
def direction_terms(
    z, k, c_ptr, curvature_ptr, c_scalar, b, num_blocks, mask, C_IS_SCALAR: tl.constexpr, HAS_HESSIAN: tl.constexpr
):
    """Direction k's contributions: c[k, b] z_k to the estimate and kappa[k, b] z_k^2 to the curvature.
    (c is gathered per element even without blocks: a scalar load lets the compiler pick the direction
    tile's layout for the loop-carried estimate, which then goes through shared memory: 72 -> 80 SASS per
    element for gaussian q = 1.)"""
    if C_IS_SCALAR:
        c = c_scalar
    else:
        c = tl.load(c_ptr + k * num_blocks + b, mask=mask, other=0.0)
    if HAS_HESSIAN:
        kappa = tl.load(curvature_ptr + k * num_blocks + b, mask=mask) * (z * z)
    else:
        kappa = 0.0
    return c * z, kappa


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "seed_index", "first_group", "num_blocks", "num_directions"])
def zo_update_kernel(
    x_ptr,  # *fp32/bf16/fp16 [n]: weights seen by the model, updated in place
    master_ptr,  # *fp32 [n]: master weights when HAS_MASTER (else unused)
    momentum_ptr,  # *float [n]: momentum buffer when HAS_MOMENTUM (else unused)
    c_ptr,  # *fp32 [num_directions, num_blocks]: finite-difference scalars (unused when C_IS_SCALAR)
    hessian_ptr,  # *fp32 [n]: curvature h when HAS_HESSIAN (updated in place)
    curvature_ptr,  # *fp32 [num_directions, num_blocks]: second-difference scalars kappa when HAS_HESSIAN
    block_starts_ptr,  # *int64 [num_blocks]: first element of each block, block_starts[0] == 0
    seed_ptr,  # *int64 [1]: the first direction's seed when SEED_IN_MEMORY (else unused)
    lr_ptr,  # *fp32 [1]: the learning rate when LR_IN_MEMORY (else unused)
    gate_ptr,  # *bool [1]: when HAS_GATE, False restores x and leaves every buffer as it was (a skipped step)
    n,  # number of elements
    num_blocks,  # blocks per direction (length of block_starts)
    num_directions,  # q: directions seed, seed + 1, ..., seed + q - 1
    seed_lo,  # low 31 bits of a host seed
    seed_hi,  # seed >> 31 of a host seed
    seed_index,  # added to the seed: direction k has seed + seed_index + k
    first_group,  # offset // GROUP: Philox group of x[0] (offset = index of x[0] within the directions)
    lead,  # offset % GROUP: position of x[0] within its group (0 keeps loads 16-byte aligned)
    c_scalar,  # fp32 finite-difference scalar when C_IS_SCALAR (q == 1, one block)
    lr,  # fp32 learning rate
    weight_decay,  # fp32 L2 coefficient (added to the gradient estimate)
    l1,  # fp32 L1 coefficient (subgradient l1 * sign(w))
    momentum,  # fp32 momentum factor
    restore_scale,  # fp32 step along the last direction that restores x (ignored with HAS_MASTER)
    hessian_smoothing,  # fp32 alpha of the curvature moving average
    hessian_min,  # fp32 floor of h
    C_IS_SCALAR: tl.constexpr,  # c comes from c_scalar, not c_ptr
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(num_blocks)): binary-search depth for the block index
    HAS_WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    HAS_L1: tl.constexpr,  # l1 != 0
    HAS_MASTER: tl.constexpr,  # keep an fp32 master copy
    HAS_MOMENTUM: tl.constexpr,  # update a momentum buffer
    HAS_HESSIAN: tl.constexpr,  # precondition by 1 / sqrt(h) and update h
    RADEMACHER: tl.constexpr,  # direction distribution: False N(0, 1), True ±1
    GROUP: tl.constexpr,  # elements per group: 1024 (normal: 128 Philox calls) or 4096 (Rademacher: 32 calls)
    TILE_SIZE: tl.constexpr,  # elements per program (= GROUP)
    WIDE: tl.constexpr,  # int64 element indices (buffers of 2**31 elements or more)
    FOLD: tl.constexpr,  # one block, no master, momentum, decay, L1 or curvature: w = x + (rs - lr c) z
    SEED_IN_MEMORY: tl.constexpr,  # read the seed from seed_ptr (replayable launches)
    LR_IN_MEMORY: tl.constexpr,  # read lr from lr_ptr
    HAS_GATE: tl.constexpr,  # read the apply flag from gate_ptr
):
    pos, group = tile_positions(first_group, lead, GROUP, TILE_SIZE, WIDE)  # this program's tile of indices
    mask = (pos >= 0) & (pos < n)
    seed = kernel_seed(seed_ptr, seed_lo, seed_hi, seed_index, SEED_IN_MEMORY)
    if LR_IN_MEMORY:
        lr = tl.load(lr_ptr)
    apply = True
    if HAS_GATE:
        apply = tl.load(gate_ptr) != 0
    # Largest b with block_starts[b] <= pos, by binary lifting over the (small, cached) table.
    b = tl.zeros_like(pos).to(tl.int32)
    for i in tl.static_range(SEARCH_STEPS):
        cand = b + (1 << (SEARCH_STEPS - 1 - i))
        start = tl.load(block_starts_ptr + cand, mask=mask & (cand < num_blocks), other=n)
        b = tl.where(start <= pos, cand, b)
    # The last direction first: it also restores x after the loop.  (Carrying z through the loop instead
    # would make the compiler pick a layout in which every thread runs every row's Philox call.)
    last = num_directions - 1
    z = direction_tile(seed + last, group, TILE_SIZE, RADEMACHER)  # uint64 seed + int32 k stays uint64
    if FOLD:  # restore and step along the last direction in one axpy, with a per-program coefficient
        w = tl.load(x_ptr + pos, mask=mask).to(tl.float32)
        c_last = c_scalar if C_IS_SCALAR else tl.load(c_ptr + last)  # one load per program, not per element
        if HAS_GATE:  # a skipped step only restores (a select, so a NaN c never reaches w)
            c_last = tl.where(apply, c_last, 0.0)
        w = w + (restore_scale - lr * c_last) * z
        for k in range(last):
            z_k = direction_tile(seed + k, group, TILE_SIZE, RADEMACHER)
            # a closed gate loads c = 0 (the load's mask), so w only restores and a NaN c never reaches it
            term, _ = direction_terms(
                z_k, k, c_ptr, curvature_ptr, c_scalar, b, num_blocks, mask & apply, C_IS_SCALAR, False
            )  # (a scalar c means q = 1: this loop never runs then)
            w = w - lr * term
        tl.store(x_ptr + pos, round_to(w, x_ptr.dtype.element_ty), mask=mask)
        return
    estimate, curvature = direction_terms(
        z, last, c_ptr, curvature_ptr, c_scalar, b, num_blocks, mask, C_IS_SCALAR, HAS_HESSIAN
    )
    for k in range(last):
        z_k = direction_tile(seed + k, group, TILE_SIZE, RADEMACHER)
        term, kappa = direction_terms(
            z_k, k, c_ptr, curvature_ptr, c_scalar, b, num_blocks, mask, C_IS_SCALAR, HAS_HESSIAN
        )
        estimate = estimate + term
        if HAS_HESSIAN:
            curvature = curvature + kappa
    if HAS_HESSIAN:
        h = tl.load(hessian_ptr + pos, mask=mask, other=1.0)
        s = inv_sqrt_rn(h)
        z = z * s  # the last direction as it was applied
        estimate = estimate * s
        h = tl.maximum(h * ((1.0 - hessian_smoothing) + hessian_smoothing * curvature), hessian_min)
        tl.store(hessian_ptr + pos, h, mask=mask & apply)
    if HAS_MASTER:
        restored = tl.load(master_ptr + pos, mask=mask)
    else:
        restored = tl.load(x_ptr + pos, mask=mask).to(tl.float32)
        restored = restored + restore_scale * z  # z is the last direction
    w = restored
    g = estimate
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * w
    if HAS_L1:
        g = g + l1 * sign(w)
    if HAS_MOMENTUM:
        g = momentum * tl.load(momentum_ptr + pos, mask=mask).to(tl.float32) + g
        tl.store(momentum_ptr + pos, round_to(g, momentum_ptr.dtype.element_ty), mask=mask & apply)
    w = w - lr * g
    if HAS_GATE:
        w = tl.where(apply, w, restored)
    if HAS_MASTER:
        tl.store(master_ptr + pos, w, mask=mask & apply)
    tl.store(x_ptr + pos, round_to(w, x_ptr.dtype.element_ty), mask=mask)


def zo_update_torch(
    x,
    seed,
    c,
    lr,
    *,
    weight_decay,
    l1,
    momentum,
    momentum_buffer,
    restore_scale,
    block_starts,
    offset,
    rademacher,
    master,
    num_directions=1,
    hessian=None,
    curvature=None,
    hessian_smoothing=0.0,
    hessian_min=0.0,
    apply=True,
) -> None:
    """Torch twin of :func:`zo_update_kernel`, in cache-sized chunks like the other twins (``seed`` and ``lr``
    as host numbers; ``apply=False`` is the kernel's closed gate: restore x, leave every buffer)."""
    fold = plain_update(block_starts, master, momentum_buffer, weight_decay, l1, hessian)
    if fold and isinstance(c, float):
        c = torch.tensor([c], dtype=torch.float32, device=x.device)  # fp32 arithmetic, as in the kernel
    if fold and not apply:  # the kernel selects 0 for every c: the same sums with zeros
        c = torch.zeros_like(c)
    flat = x.view(-1)
    num_blocks = 1 if block_starts is None else block_starts.numel()
    for start, stop in chunks(flat.numel(), twin_chunk(rademacher)):
        if block_starts is not None:
            block = torch.searchsorted(block_starts, torch.arange(start, stop, device=x.device), right=True) - 1
        last = num_directions - 1
        if fold:  # the kernel's FOLD path: w = x + (restore_scale - lr c_last) z_last - sum_k lr (c_k z_k)
            w = flat[start:stop].to(torch.float32)
            w = w + direction_torch(seed + last, offset + start, stop - start, x.device, rademacher) * (
                restore_scale - c[last : last + 1] * lr
            )
            for k in range(last):
                z_k = direction_torch(seed + k, offset + start, stop - start, x.device, rademacher)
                w = w - (c[k : k + 1] * z_k) * lr
            flat[start:stop] = w.to(x.dtype)
            continue
        estimate = curv = z = None
        for k in (last, *range(last)):  # the kernel's order: the last direction (which restores x) first
            z_k = direction_torch(seed + k, offset + start, stop - start, x.device, rademacher)
            if isinstance(c, float):
                c_k = c
            elif block_starts is None:
                c_k = c[k : k + 1]
            else:
                c_k = c[k * num_blocks + block]
            estimate = c_k * z_k if estimate is None else estimate + c_k * z_k
            if hessian is not None:
                kappa = curvature[k : k + 1] if block_starts is None else curvature[k * num_blocks + block]
                curv = kappa * (z_k * z_k) if curv is None else curv + kappa * (z_k * z_k)
            if k == last:
                z = z_k
        if hessian is not None:
            h = hessian.view(-1)[start:stop]
            s = inv_sqrt_rn_torch(h)
            z = z * s
            estimate = estimate * s
            if apply:
                h.copy_(torch.clamp_min(h * ((1.0 - hessian_smoothing) + curv * hessian_smoothing), hessian_min))
        if master is not None:
            w = master.view(-1)[start:stop]
        else:
            w = flat[start:stop].to(torch.float32)
            w = w + z * restore_scale
        if not apply:
            flat[start:stop] = w.to(x.dtype)
            continue
        g = estimate
        if weight_decay != 0.0:
            g = g + w * weight_decay
        if l1 != 0.0:
            g = g + torch.sign(w) * l1
        if momentum_buffer is not None:
            buf = momentum_buffer.view(-1)
            g = buf[start:stop].to(torch.float32) * momentum + g
            buf[start:stop] = g.to(buf.dtype)
        w = w - g * lr
        if master is not None:
            master.view(-1)[start:stop] = w
        flat[start:stop] = w.to(x.dtype)


def plain_update(block_starts, master, momentum_buffer, weight_decay, l1, hessian) -> bool:
    """The update is ``w = x + restore_scale z_last - lr sum_k c_k z_k`` alone (one block, no master,
    momentum, decay, L1 or curvature): kernel and twin then fold the restore and the last direction's step
    into one coefficient (FOLD: 2 instead of 5 float ops per element)."""
    return (
        block_starts is None
        and master is None
        and momentum_buffer is None
        and weight_decay == 0.0
        and l1 == 0.0
        and hessian is None
    )


def make_block_starts(block_sizes, device=None) -> torch.Tensor:
    """Validated int64 table of block start offsets for :func:`zo_update_`, built once per layout.

    ``block_sizes`` are element counts (each >= 1), in buffer order; the blocks must tile the buffer.
    """
    sizes = [int(s) for s in block_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"block_sizes must be a non-empty sequence of positive ints, got {sizes[:8]}")
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    return torch.tensor(starts, dtype=torch.int64, device=device)


def check_zo_update_args(
    x,
    c,
    lr,
    *,
    num_directions,
    weight_decay,
    l1,
    momentum,
    momentum_buffer,
    block_starts,
    offset,
    master,
    hessian,
    curvature,
    hessian_smoothing,
    hessian_min,
    gate,
    **_unchecked,
) -> None:
    """:func:`zo_update_`'s argument rules, each with a one-line error (called with its arguments:
    ``check_zo_update_args(**locals())``; ``seed``, ``lr`` as a tensor, ``distribution`` and ``backend`` are
    checked where they are used, on every launch)."""
    check_float_dtype("x", x)
    check_contiguous("x", x)
    if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
        raise ValueError(f"num_directions must be an int >= 1, got {num_directions!r}")
    check_direction_range(offset, x.numel())
    # a seed and a tensor lr are checked by seed_args and device_scalar, which every launch runs
    check_nonnegative(
        lr=0.0 if isinstance(lr, torch.Tensor) else lr, weight_decay=weight_decay, l1=l1, momentum=momentum
    )
    check_gate(gate, x)
    if momentum != 0.0 and momentum_buffer is None:
        raise ValueError("momentum != 0 needs a momentum_buffer (a zero tensor like x)")
    if momentum_buffer is not None:
        check_same_layout("momentum_buffer", momentum_buffer, x)
        check_float_dtype("momentum_buffer", momentum_buffer)
    if master is not None:
        check_same_layout("master", master, x)
        if master.dtype != torch.float32:
            raise ValueError(f"master must be float32, got {master.dtype}")
    if not isinstance(c, torch.Tensor):
        if num_directions != 1 or block_starts is not None:
            raise ValueError(
                "a scalar c means one direction and one block; pass a tensor of c values "
                "for several directions or blocks"
            )
    elif block_starts is None and c.numel() != num_directions:
        raise ValueError(
            f"c has {c.numel()} values for {num_directions} direction(s) and no blocks; "
            "pass one value per direction, or per direction and block with block_starts "
            "(build it with make_block_starts(sizes))"
        )
    elif block_starts is not None and (
        block_starts.dim() != 1
        or block_starts.dtype != torch.int64
        or block_starts.numel() * num_directions != c.numel()
    ):
        raise ValueError(
            f"block_starts must be a 1-D int64 tensor with one entry per block, and c "
            f"must hold num_directions x blocks values; got block_starts "
            f"{tuple(block_starts.shape)} {block_starts.dtype}, c with {c.numel()} values "
            f"for {num_directions} direction(s)"
        )
    if hessian is not None:
        check_same_layout("hessian", hessian, x)
        if (
            hessian.dtype != torch.float32
            or not isinstance(c, torch.Tensor)
            or curvature is None
            or curvature.numel() != c.numel()
        ):
            raise ValueError(
                "hessian needs a float32 buffer like x, a tensor c, and curvature with one value per value of c"
            )
        if not 0.0 <= hessian_smoothing <= 1.0 or not hessian_min > 0:
            raise ValueError(
                f"hessian_smoothing must be in [0, 1] and hessian_min > 0, got {hessian_smoothing}, {hessian_min}"
            )


def zo_update_(
    x: torch.Tensor,
    seed: int | torch.Tensor,
    c,
    lr: float | torch.Tensor,
    *,
    num_directions: int = 1,
    weight_decay: float = 0.0,
    l1: float = 0.0,
    momentum: float = 0.0,
    momentum_buffer: torch.Tensor | None = None,
    restore_scale: float = 0.0,
    block_starts: torch.Tensor | None = None,
    offset: int = 0,
    distribution: str = "gaussian",
    master: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    curvature: torch.Tensor | None = None,
    hessian_smoothing: float = 0.0,
    hessian_min: float = 1e-4,
    gate: torch.Tensor | None = None,
    seed_index: int = 0,
    backend: str | None = None,
    validate_args: bool = True,
) -> torch.Tensor:
    """Restore ``x`` and apply ``x -= lr * (sum_k c_k * z_k + weight_decay * x + l1 * sign(x))`` in one pass.

    Args:
        x: contiguous float32/bfloat16/float16 weights, updated in place.
        seed, offset, distribution, seed_index: the directions, as in :func:`perturb_`; direction ``k`` of
            the step has seed ``seed + seed_index + k``.  A tensor seed is read by the kernel.
        c: finite-difference scalars: a float (one direction, one block); a float32 tensor with one
            value per direction; or ``num_directions * num_blocks`` values (direction-major) with
            ``block_starts``.  Tensors may stay on the device.  Averaging over directions (``1/q``) is
            the caller's choice, folded into ``c``.
        lr: a number, or a 1-element float32 tensor on ``x``'s device that the kernel reads (no host read,
            and a replayed launch uses its current value); weight_decay, l1, momentum: runtime numbers.
        num_directions: q, the number of directions combined in this step.
        momentum_buffer: tensor like ``x`` (any float dtype); required when ``momentum != 0``.
        restore_scale: ``x += restore_scale * z_last`` before the step (``+eps`` after a ``-eps``
            evaluation of the last direction); ignored with ``master``, which is never perturbed.
        block_starts: int64 tensor from :func:`make_block_starts` (first element of each block).
        master: float32 master copy of ``x``; when given the step is applied to it and ``x = cast(master)``.
        hessian: float32 curvature ``h > 0`` like ``x`` (HiZOO): precondition by ``1/sqrt(h)`` and update h
            from ``curvature`` (same layout as a tensor ``c``) with ``hessian_smoothing`` (alpha) and floor
            ``hessian_min``.
        gate: optional 1-element bool tensor on the device: where False the step is skipped on the device
            (x restored, or rewritten from ``master``; momentum, curvature and master untouched; a NaN ``c``
            never reaches them).
        validate_args: check every argument first (one-line errors).  The optimizers pass False: they
            validated their settings once, at construction, and build these arguments themselves.
    Returns ``x``.
    """
    if validate_args:
        check_zo_update_args(**locals())
    rademacher = is_rademacher(distribution)
    s = seed_args(seed, seed_index, num_directions, x)
    n = x.numel()
    lr_tensor = device_scalar("lr", lr, x)
    if isinstance(c, torch.Tensor):
        c = c.reshape(-1).to(device=x.device, dtype=torch.float32)
        num_blocks = 1 if block_starts is None else block_starts.numel()
        if block_starts is not None:
            block_starts = block_starts.to(x.device)
    else:
        c, num_blocks = f32(c), 1
    if hessian is not None:
        curvature = curvature.reshape(-1).to(device=x.device, dtype=torch.float32)
    weight_decay, l1, momentum, restore_scale = map(f32, (weight_decay, l1, momentum, restore_scale))
    hessian_smoothing, hessian_min = f32(hessian_smoothing), f32(hessian_min)

    tensors = [t for t in (x, master, momentum_buffer, hessian) if t is not None]
    if resolve_backend(backend, *tensors) == "triton":
        if n:
            c_is_scalar = isinstance(c, float)
            fold = plain_update(block_starts, master, momentum_buffer, weight_decay, l1, hessian)
            t = tile_launch(offset, n, rademacher)
            zo_update_kernel[t.grid](
                x,
                master if master is not None else x,
                momentum_buffer if momentum_buffer is not None else x,
                x if c_is_scalar else c,
                hessian if hessian is not None else x,
                curvature if curvature is not None else x,
                block_starts if block_starts is not None else x,
                s.tensor if s.tensor is not None else x,
                lr_tensor if lr_tensor is not None else x,
                gate if gate is not None else x,
                n,
                num_blocks,
                num_directions,
                s.lo,
                s.hi,
                s.index,
                t.first_group,
                t.lead,
                c if c_is_scalar else 0.0,
                0.0 if lr_tensor is not None else f32(lr),
                weight_decay,
                l1,
                momentum,
                restore_scale,
                hessian_smoothing,
                hessian_min,
                C_IS_SCALAR=c_is_scalar,
                SEARCH_STEPS=max(0, math.ceil(math.log2(num_blocks))),
                HAS_WEIGHT_DECAY=weight_decay != 0.0,
                HAS_L1=l1 != 0.0,
                HAS_MASTER=master is not None,
                HAS_MOMENTUM=momentum_buffer is not None,
                HAS_HESSIAN=hessian is not None,
                FOLD=fold,
                RADEMACHER=rademacher,
                GROUP=t.group,
                WIDE=t.wide,
                TILE_SIZE=t.tile_size,
                SEED_IN_MEMORY=s.tensor is not None,
                LR_IN_MEMORY=lr_tensor is not None,
                HAS_GATE=gate is not None,
                num_warps=t.num_warps,
                enable_fp_fusion=False,
            )
    else:
        zo_update_torch(
            x,
            seed_value(seed, seed_index),
            c,
            host_scalar(lr),
            weight_decay=weight_decay,
            l1=l1,
            momentum=momentum,
            momentum_buffer=momentum_buffer,
            restore_scale=restore_scale,
            block_starts=block_starts,
            offset=offset,
            rademacher=rademacher,
            master=master,
            num_directions=num_directions,
            hessian=hessian,
            curvature=curvature,
            hessian_smoothing=hessian_smoothing,
            hessian_min=hessian_min,
            apply=gate_open(gate),
        )
    return x


def zo_estimate_(
    out: torch.Tensor,
    seed: int | torch.Tensor,
    c,
    *,
    num_directions: int = 1,
    block_starts: torch.Tensor | None = None,
    offset: int = 0,
    distribution: str = "gaussian",
    seed_index: int = 0,
    backend: str | None = None,
    validate_args: bool = True,
) -> torch.Tensor:
    """Materialise the gradient estimate ``out = sum_k c[k, b] z_k`` into a float32 buffer (ZOAdam feeds it
    to :func:`adamw_step_`); ``c``, ``block_starts``, ``offset`` and the directions as in :func:`zo_update_`.

    One :func:`zo_update_` pass over the zeroed buffer with ``lr = 1`` and ``-c``: ``0 - 1 * sum_k (-c_k) z_k``
    is ``sum_k c_k z_k`` bit for bit (negation commutes with IEEE rounding), so no extra kernel is compiled.
    ``validate_args`` as in :func:`zo_update_`.  Returns ``out``.
    """
    if validate_args and out.dtype != torch.float32:
        raise ValueError(f"out must be float32 (the estimate is accumulated in fp32), got {out.dtype}")
    out.zero_()
    return zo_update_(
        out,
        seed,
        -c,
        1.0,
        num_directions=num_directions,
        block_starts=block_starts,
        offset=offset,
        distribution=distribution,
        seed_index=seed_index,
        backend=backend,
        validate_args=validate_args,
    )
