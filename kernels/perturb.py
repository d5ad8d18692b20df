"""In-place perturbation along a seeded direction: ``x += scale * z(seed)``.

One pass over ``x`` (read + write), no direction tensor in memory.  With ``source=`` (an fp32 master
copy) it writes ``x = cast(source + scale * z)`` instead, so a bf16/fp16 model is perturbed from exact
fp32 weights and restoring it is exact (see ``zo_update.py``).  With ``precond=h`` (a positive fp32
curvature estimate, as kept by HiZOO) the direction is preconditioned: ``z_i / sqrt(h_i)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import (
    check_contiguous,
    check_direction_range,
    check_float_dtype,
    check_same_layout,
    f32,
    inv_sqrt_rn,
    inv_sqrt_rn_torch,
    require,
    resolve_backend,
    round_to,
    split_seed,
)
from .philox import (
    direction_tile,
    is_rademacher,
    iter_direction_chunks,
    kernel_seed,
    seed_args,
    seed_value,
    tile_launch,
    tile_positions,
    twin_chunk,
)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "seed_index", "first_group"])
def perturb_kernel(
    x_ptr,  # *fp32/bf16/fp16 [n]: buffer to perturb, updated in place
    source_ptr,  # *fp32 [n]: master copy read instead of x when HAS_SOURCE (else unused)
    precond_ptr,  # *fp32 [n]: curvature h > 0 when HAS_PRECOND: the direction becomes z / sqrt(h)
    seed_ptr,  # *int64 [1]: the direction's seed when SEED_IN_MEMORY (else unused)
    n,  # number of elements
    seed_lo,  # low 31 bits of a host seed
    seed_hi,  # seed >> 31 of a host seed
    seed_index,  # added to the seed (direction k of a step)
    first_group,  # offset // GROUP: Philox group of x[0] (offset = index of x[0] within the direction)
    lead,  # offset % GROUP: position of x[0] within its group (0 keeps loads 16-byte aligned)
    scale,  # fp32 step along the direction (runtime: changing it never recompiles)
    HAS_SOURCE: tl.constexpr,  # read the fp32 master copy instead of x
    HAS_PRECOND: tl.constexpr,  # scale the direction by 1 / sqrt(precond)
    SEED_IN_MEMORY: tl.constexpr,  # read the seed from seed_ptr (replayable launches)
    RADEMACHER: tl.constexpr,  # direction distribution: False N(0, 1), True ±1
    GROUP: tl.constexpr,  # elements per group: 1024 (normal: 128 Philox calls) or 4096 (Rademacher: 32 calls)
    TILE_SIZE: tl.constexpr,  # elements per program (= GROUP)
    WIDE: tl.constexpr,  # int64 element indices (buffers of 2**31 elements or more)
):
    """x[i] = cast((source[i] if HAS_SOURCE else x[i]) + scale * z_seed[offset + i]), in fp32."""
    pos, group = tile_positions(first_group, lead, GROUP, TILE_SIZE, WIDE)  # this program's tile of indices
    mask = (pos >= 0) & (pos < n)
    if HAS_SOURCE:
        w = tl.load(source_ptr + pos, mask=mask)
    else:
        w = tl.load(x_ptr + pos, mask=mask).to(tl.float32)
    z = direction_tile(
        kernel_seed(seed_ptr, seed_lo, seed_hi, seed_index, SEED_IN_MEMORY), group, TILE_SIZE, RADEMACHER
    )
    if HAS_PRECOND:
        z = z * inv_sqrt_rn(tl.load(precond_ptr + pos, mask=mask, other=1.0))
    w = w + scale * z
    tl.store(x_ptr + pos, round_to(w, x_ptr.dtype.element_ty), mask=mask)


def perturb_torch(
    x: torch.Tensor,
    seed: int,
    scale: float,
    offset: int = 0,
    rademacher: bool = False,
    source: torch.Tensor | None = None,
    precond: torch.Tensor | None = None,
) -> None:
    """Torch twin of :func:`perturb_kernel` (same operations in the same order)."""
    flat, src = x.view(-1), (source.view(-1) if source is not None else x.view(-1))
    for start, stop, z in iter_direction_chunks(
        seed, offset, flat.numel(), x.device, rademacher, twin_chunk(rademacher)
    ):
        if precond is not None:
            z = z * inv_sqrt_rn_torch(precond.view(-1)[start:stop])
        z *= scale  # z is this chunk's own tensor
        if source is None and x.dtype == torch.float32:
            flat[start:stop] += z  # w + scale z, rounded once, without a temporary
        else:
            flat[start:stop] = (src[start:stop].to(torch.float32) + z).to(x.dtype)


def perturb_(
    x: torch.Tensor,
    seed: int | torch.Tensor,
    scale: float,
    backend: str | None = None,
    *,
    offset: int = 0,
    distribution: str = "gaussian",
    source: torch.Tensor | None = None,
    precond: torch.Tensor | None = None,
    seed_index: int = 0,
    validate_args: bool = True,
) -> torch.Tensor:
    """In place ``x += scale * z(seed + seed_index)``, ``z`` indexed by element position in ``x`` (plus ``offset``).

    Args:
        x: contiguous float32/bfloat16/float16 tensor, updated in place (arithmetic in float32).
        seed: names the direction: an int in [0, 2**62), or a 1-element int64 tensor on ``x``'s device,
            read by the kernel (so a replayed launch, as in a CUDA graph, uses the current step's seed).
        seed_index: added to the seed (direction k of a step is ``seed + k``).
        scale: step along the direction (for example +eps, then -2 eps).
        backend: "triton", "torch" or None (auto: Triton for CUDA tensors; ``SUBGRAD_BACKEND`` overrides).
        offset: index of ``x[0]`` within the direction, so several buffers can share one direction.
        distribution: "gaussian" (``philox_normal``) or "rademacher" (``philox_rademacher``).
        source: optional float32 master copy; then ``x = cast(source + scale * z)`` and ``source`` is
            left untouched.
        precond: optional positive float32 curvature ``h`` like ``x``; the direction becomes ``z / sqrt(h)``.
        validate_args: check every argument first (one-line errors); the optimizers pass False (they
            validated their settings once, at construction, and build these arguments themselves).
    Returns ``x``.
    """
    if validate_args:
        check_float_dtype("x", x)
        check_contiguous("x", x)
        check_direction_range(offset, x.numel())
        if source is not None:
            check_same_layout("source", source, x)
            require("source (the master copy)", source.dtype == torch.float32, "float32", source.dtype)
        if precond is not None:
            check_same_layout("precond", precond, x)
            require("precond", precond.dtype == torch.float32, "float32", precond.dtype)
    rademacher = is_rademacher(distribution)
    s = seed_args(seed, seed_index, 1, x)
    scale = f32(scale)
    tensors = tuple(t for t in (x, source, precond) if t is not None)
    if resolve_backend(backend, *tensors) == "triton":
        n = x.numel()
        if n:
            t = tile_launch(offset, n, rademacher)
            perturb_kernel[t.grid](
                x,
                source if source is not None else x,
                precond if precond is not None else x,
                s.tensor if s.tensor is not None else x,
                n,
                s.lo,
                s.hi,
                s.index,
                t.first_group,
                t.lead,
                scale,
                HAS_SOURCE=source is not None,
                HAS_PRECOND=precond is not None,
                SEED_IN_MEMORY=s.tensor is not None,
                RADEMACHER=rademacher,
                GROUP=t.group,
                WIDE=t.wide,
                TILE_SIZE=t.tile_size,
                num_warps=t.num_warps,
                enable_fp_fusion=False,
            )
    else:
        perturb_torch(x, seed_value(seed, seed_index), scale, offset, rademacher, source, precond)
    return x


def perturb_launcher(
    x: torch.Tensor,
    seed: int | torch.Tensor,
    backend: str | None = None,
    *,
    offset: int = 0,
    distribution: str = "gaussian",
    source: torch.Tensor | None = None,
    precond: torch.Tensor | None = None,
) -> Callable[[float, int], None]:
    """:func:`perturb_` (arguments unchecked) prepared once for one buffer: backend, launch shape, tensors
    and constexprs are settled here, and each call ``launch(scale, seed_index)`` is one
    ``perturb_(x, seed, scale, ..., seed_index=seed_index)``.  The zeroth-order optimizers keep one per
    piece of each block, so a step's many perturbations cost a kernel launch each and nothing more.
    A tensor ``seed`` is read by the kernel at each launch; an int seed is split at each call."""
    rademacher = is_rademacher(distribution)
    n = x.numel()
    if resolve_backend(backend, *(t for t in (x, source, precond) if t is not None)) != "triton":

        def twin(scale: float, seed_index: int) -> None:
            perturb_torch(x, seed_value(seed, seed_index), f32(scale), offset, rademacher, source, precond)

        return twin
    t = tile_launch(offset, n, rademacher)
    seed_tensor = seed if isinstance(seed, torch.Tensor) else None
    tensors = (x, source if source is not None else x, precond if precond is not None else x)
    constexprs = dict(
        HAS_SOURCE=source is not None,
        HAS_PRECOND=precond is not None,
        SEED_IN_MEMORY=seed_tensor is not None,
        RADEMACHER=rademacher,
        GROUP=t.group,
        WIDE=t.wide,
        TILE_SIZE=t.tile_size,
        num_warps=t.num_warps,
        enable_fp_fusion=False,
    )

    def launch(scale: float, seed_index: int) -> None:
        if not n:
            return
        if seed_tensor is not None:  # the module's kernel looked up at each call: subgrad.testing sees it
            perturb_kernel[t.grid](
                *tensors, seed_tensor, n, 0, 0, seed_index, t.first_group, t.lead, f32(scale), **constexprs
            )
        else:
            lo, hi = split_seed(seed + seed_index)
            perturb_kernel[t.grid](*tensors, x, n, lo, hi, 0, t.first_group, t.lead, f32(scale), **constexprs)

    return launch
