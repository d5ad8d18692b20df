"""Counter-based random directions: Philox4x32-10 with every output word used, and a torch twin with
the same bits.

A direction is named by a seed and never stored: element ``e`` of direction ``seed`` is a function of
``(seed, e)`` only, computed by whichever kernel needs it.

Bits.  ``tl.randint4x(seed, g)`` with a 32-bit counter ``g`` runs ten Philox4x32 rounds on the counter
block ``(g, 0, 0, 0)`` with key ``(seed mod 2**32, seed >> 32)`` and returns four 32-bit words
``w0..w3``.  :func:`philox4x32_torch` reimplements those rounds with int64 torch ops (it matches
Random123's published known-answer vectors), so the words are identical on every backend and device.

The direction map (one Philox call feeds a whole group of neighbouring elements; no word is wasted):

* **Normal**: groups of 1024 elements from 128 calls, eight normals per call, two per 32-bit word ``w``
  (a Box-Muller pair of 15-bit draws and two sign bits).  Element ``e = 1024 G + 512 h + 4 g + 2 i + s``
  is output ``s`` of word ``2 h + i`` of call ``128 G + g``: read as a ``[256, 4]`` tile, call ``g`` feeds
  rows ``g`` and ``128 + g``, the two rows one GPU thread owns in Triton's 4-wide float32 layout, so a
  thread draws one call for its 8 elements.  A word's pair is

      u = v 2**-16,  v = 2 (bits 16..30 of w) + 1            (odd, so 0 < u < 1)
      y = (2 (bits 0..14 of w, signed) + 1) 2**-15             (odd grid, symmetric in (-1, 1))
      r = sqrt(-2 ln u),  theta = pi/4 (1 + y)                 (a uniform angle in (0, pi/2))
      z[.., s=0] = +-r cos(theta)   (sign: bit 31),   z[.., s=1] = +-r sin(theta)   (sign: bit 15)

  The sign bits pick the quadrant, so the angle is uniform on the circle (2**17 angles) and every pair
  is a Box-Muller pair of two independent normals, as exact Box-Muller as 15-bit draws allow: |z| <= 4.71
  (sqrt(32 ln 2), the smallest u; a true normal exceeds it with probability 2.5e-6 per element) and the
  radius takes 32768 values.  For a random search direction neither is visible (tests/test_philox.py:
  moments, kurtosis and a Kolmogorov-Smirnov test on 2**20 draws).  What it buys: one Philox call per 8
  normals instead of 4 (Philox is the integer pipe's largest cost), and a log and root per pair with no
  division.
* **Rademacher**: groups of 4096 elements from 32 calls.  Element ``e = 4096 G + 128 b + 4 l + k`` is ``-1``
  if bit ``b`` of word ``w_k`` of call ``32 G + l`` is set, else ``+1``: all 128 bits of a call are signs.
  Read as a ``[32, 128]`` tile (row ``b``, column ``4 l + k``), call ``l`` feeds one 4-wide column strip, so
  the GPU thread that owns those four columns draws the call once and takes a bit of it per row: one
  Philox call per 32 elements a thread handles, where a map with a call per row would cost one per 4.

This map is not ``tl.randn``'s (one call per element, three words discarded): direction generation, not
memory, bounds every zeroth-order kernel, so each Philox word is used (benchmarks/README.md).

Bit-identical normals.  ln, cos and sin are near-minimax float32 polynomials (:func:`half_radius`,
:func:`normal_pair`): integer ops, fixed sequences of IEEE float32 additions and multiplications with no
FMA contraction (kernels launch with ``enable_fp_fusion=False``) and ``tl.sqrt_rn`` for the root.  IEEE
754 fixes the result of each of those operations, so **normal directions are bit-identical across the
Triton kernel, the torch twin, CPU and GPU**, not merely close.  Against float64 Box-Muller of the same
15-bit draws they are within 1.2e-6 (2 float32 ulp at the largest radius; tested in ``tests/test_philox.py``).

Twin speed.  On CPU, :func:`normal_pairs` runs the normal twin through ``torch.compile`` (one fused C++ loop
instead of ~160 torch ops; same bits, checked on a probe before first use, eager fallback); see the comment
above ``COMPILED_MIN_CALLS``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    NUM_WARPS,
    TILE_SIZE,
    TWIN_CHUNK,
    check_direction_range,
    chunks,
    f32,
    grid,
    resolve_backend,
    split_seed,
    sqrt_rn_torch,
)

# --------------------------------------------------------------------------------------------------
# Constants (all exactly representable in float32, so kernel and twin multiply by the same value)
# --------------------------------------------------------------------------------------------------
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

TWO_M31: tl.constexpr = tl.constexpr(2.0**-31)  # angle integers are multiples of 2**16 below 2**31
SQRT_HALF_BITS: tl.constexpr = tl.constexpr(0x3F3504F3)  # float32 bits of sqrt(1/2): the log's range split
LN2: tl.constexpr = tl.constexpr(f32(math.log(2.0)))
# Near-minimax polynomials, fitted in float64 (Lawson iteration on 20,000 Chebyshev points) and rounded to
# float32.  Only their values matter for the bits, so kernel and twin share these numbers.
#   ln(1 + f) = f + f^2 (L0 + f (L1 + ... + f L5)) on f in [sqrt(1/2) - 1, sqrt(2) - 1]: relative error 1.3e-6
LOG_C = [
    f32(c)
    for c in (
        -0.5000084638595581,
        0.33319219946861267,
        -0.24919074773788452,
        0.20449185371398926,
        -0.18587474524974823,
        0.11948983371257782,
    )
]
#   cos(pi y / 4) = 1 + t (C1 + t (C2 + t C3)), t = y^2, |y| < 1: absolute error 3.2e-8
COS_C = [f32(c) for c in (-0.3084245026111603, 0.01585039682686329, -0.0003191600553691387)]
#   sin(pi y / 4) = y (S0 + t (S1 + t (S2 + t S3))): relative error 2.4e-9
SIN_C = [f32(c) for c in (0.7853981852531433, -0.08074543625116348, 0.002490007085725665, -3.59545047103893e-05)]
LOG_C0, LOG_C1, LOG_C2, LOG_C3, LOG_C4, LOG_C5 = (tl.constexpr(c) for c in LOG_C)
COS_C1, COS_C2, COS_C3 = (tl.constexpr(c) for c in COS_C)
SIN_C0, SIN_C1, SIN_C2, SIN_C3 = (tl.constexpr(c) for c in SIN_C)

DISTRIBUTIONS = ("gaussian", "rademacher")
NORMAL_CALLS = 128  # Philox calls per normal group, 8 normals each (four Box-Muller pairs)
NORMAL_GROUP = 8 * NORMAL_CALLS  # elements per normal group: a [256, 4] tile, one kernel program
assert NORMAL_GROUP == TILE_SIZE
NORMAL_CALLS_TL: tl.constexpr = tl.constexpr(NORMAL_CALLS)
NORMAL_GROUP_TL: tl.constexpr = tl.constexpr(NORMAL_GROUP)
RADEMACHER_CALLS = 32  # Philox calls per Rademacher group: one per 4-wide column strip of the tile
RADEMACHER_GROUP = 128 * RADEMACHER_CALLS  # elements per Rademacher group: a [32 bits, 128 columns] tile
RADEMACHER_CALLS_TL: tl.constexpr = tl.constexpr(RADEMACHER_CALLS)


def is_rademacher(distribution: str) -> bool:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution == "rademacher"


def group_size(rademacher: bool) -> int:
    """Elements of a direction in one group: a [256, 4] tile of 128 Philox calls (normal) or a [32, 128]
    tile of 32 calls (Rademacher).  A kernel program is one group; an offset inside a group is masked off."""
    return RADEMACHER_GROUP if rademacher else NORMAL_GROUP


class TileLaunch(NamedTuple):
    """How a kernel walks ``n`` elements of a direction from element ``offset`` on (see ``tile_launch``)."""

    grid: tuple[int]  # programs
    first_group: int  # offset // GROUP: the group holding element ``offset``
    lead: int  # offset % GROUP: elements of the first group before the buffer starts (masked off)
    group: int  # GROUP: elements per group
    tile_size: int  # TILE_SIZE: elements per program (one group)
    num_warps: int
    wide: bool  # element indices need 64 bits


class SeedArgs(NamedTuple):
    """How a launch receives its seed (see :func:`kernel_seed`): from memory, or as host halves."""

    tensor: torch.Tensor | None  # int64 [1] on the kernel's device holding the seed (SEED_IN_MEMORY), else None
    lo: int  # low 31 bits of a host seed (0 with a tensor)
    hi: int  # seed >> 31 of a host seed (0 with a tensor)
    index: int  # added to the seed in the kernel (direction k of a step: seed + k)


def seed_args(seed: int | torch.Tensor, seed_index: int, count: int, like: torch.Tensor) -> SeedArgs:
    """Check a seed for a launch that uses seeds ``seed + seed_index .. + count - 1``.

    ``seed`` is an int in [0, 2**62) or a 1-element int64 tensor on ``like``'s device (its value is the
    producer's promise, :func:`subgrad.kernels.next_step_seed_` keeps it below 2**61: reading it here would
    synchronise with the device)."""
    if isinstance(seed_index, bool) or not isinstance(seed_index, int) or not 0 <= seed_index < 2**31:
        raise ValueError(f"seed_index must be an int in [0, 2**31), got {seed_index!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != like.device:
            raise ValueError(
                f"a tensor seed must be one int64 value on {like.device} (got {seed.dtype} "
                f"{tuple(seed.shape)} on {seed.device}); or pass an int"
            )
        return SeedArgs(seed, 0, 0, seed_index)
    split_seed(seed + seed_index + count - 1)
    lo, hi = split_seed(seed + seed_index)
    return SeedArgs(None, lo, hi, 0)


def seeded_output(seed: int | torch.Tensor, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """The empty output of a draw from ``seed``: on ``device``, else on a tensor seed's device, else the CPU."""
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else "cpu"
    return torch.empty(shape, dtype=dtype, device=torch.device(device))


def seed_value(seed: int | torch.Tensor, seed_index: int = 0) -> int:
    """The seed a twin uses: ``seed + seed_index`` (a tensor seed is read; on CPU that is no sync)."""
    return (int(seed.reshape(())) if isinstance(seed, torch.Tensor) else seed) + seed_index


def tile_launch(offset: int, n: int, rademacher: bool) -> TileLaunch:
    """Launch shape of a kernel that walks ``n`` elements starting at element ``offset`` of a direction.

    A program is one group: program ``p`` handles group ``first_group + p``, and the buffer starts ``lead``
    elements into the first group.  A normal program is 1024 elements (128 Philox calls) on 4 warps, 8
    elements and one call per thread; a Rademacher program is 4096 elements on 8 warps, so a thread
    handles 16 elements, all from one Philox call (4 warps would halve the calls per element but double
    the registers per thread: 132 instead of 72 for zo_update_).
    """
    group = group_size(rademacher)
    tile = group
    first_group, lead = divmod(offset, group)
    programs = max(1, math.ceil((n + lead) / tile))
    return TileLaunch(
        (programs,), first_group, lead, group, tile, 8 if rademacher else NUM_WARPS, programs * tile >= 2**31
    )


# --------------------------------------------------------------------------------------------------
# Triton device functions (used by every kernel that needs z)
# --------------------------------------------------------------------------------------------------
@triton.jit
def philox_seed(seed_lo, seed_hi):
    """Rebuild the 62-bit seed from its two non-negative int32 halves (see ``split_seed``)."""
    return (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)


@triton.jit
def kernel_seed(seed_ptr, seed_lo, seed_hi, seed_index, SEED_IN_MEMORY: tl.constexpr):
    """A launch's direction seed, ``seed + seed_index``: the seed read from device memory (a replayed
    launch, as in a CUDA graph, sees the current step's seed) or rebuilt from its host halves."""
    if SEED_IN_MEMORY:
        seed = tl.load(seed_ptr).to(tl.uint64)
    else:
        seed = philox_seed(seed_lo, seed_hi)
    return seed + seed_index


@triton.jit
def half_radius(w):
    """r = sqrt(-ln u) of the radius uniform u = v 2**-16, v = bits 16..30 of ``w`` as an odd integer in
    [1, 65535] (exact in float32; never 0 or 1 after halving, so the log is finite and negative).

    ln v = k ln 2 + ln m with m in [sqrt(1/2), sqrt(2)): the exponent split is done on the float bits of
    v (subtracting sqrt(1/2)'s bits moves the exponent boundary there), so ln m = ln(1 + f) with f = m - 1
    exact; -ln u = (16 - k) ln 2 - ln(1 + f) keeps full relative accuracy as u -> 1 (k = 16)."""
    v = ((w >> 15) & 0xFFFE) | 1
    bits = v.to(tl.int32).to(tl.float32).to(tl.int32, bitcast=True)
    k = (bits - SQRT_HALF_BITS) >> 23
    f = (bits - (k << 23)).to(tl.float32, bitcast=True) - 1.0
    p = f * (f * (LOG_C0 + f * (LOG_C1 + f * (LOG_C2 + f * (LOG_C3 + f * (LOG_C4 + f * LOG_C5))))))
    return tl.sqrt_rn((16 - k).to(tl.float32) * LN2 - (f + p))


@triton.jit
def normal_pair(w):
    """The two normals of one Philox word (module docstring): radius r = sqrt(-ln u) from bits 16..30, angle
    pi/4 + pi/4 y with y from bits 0..14 on an odd symmetric grid in (-1, 1), quadrant from the sign bits
    31 and 15.  cos(pi/4 + a) = (cos a - sin a) / sqrt(2), and the 1/sqrt(2) is the radius's halving."""
    r = half_radius(w)
    y = ((w << 17) | (1 << 16)).to(tl.int32, bitcast=True).to(tl.float32) * TWO_M31
    t = y * y
    c = 1.0 + t * (COS_C1 + t * (COS_C2 + t * COS_C3))
    s = y * (SIN_C0 + t * (SIN_C1 + t * (SIN_C2 + t * SIN_C3)))
    z0 = (r * (c - s)).to(tl.uint32, bitcast=True) ^ (w & 0x80000000)
    z1 = (r * (c + s)).to(tl.uint32, bitcast=True) ^ ((w << 16) & 0x80000000)
    return z0.to(tl.float32, bitcast=True), z1.to(tl.float32, bitcast=True)


@triton.jit
def direction_tile(seed, first_group, TILE_SIZE: tl.constexpr, RADEMACHER: tl.constexpr):
    """This program's ``TILE_SIZE`` elements of direction ``seed`` from group ``first_group`` on, as a
    float32 tile shaped like :func:`tile_positions`'s (see the module docstring for the map):

    * normal: ``[256, 4]``, one group: rows g and 128 + g = call ``128 first_group + g`` (eight normals);
    * Rademacher: ``[32, 128]``, one group: column strip l = call ``32 first_group + l``, row b = bit b.
    """
    if RADEMACHER:
        # Calls are drawn on a [32] vector (one per column strip) and spread over the strip's four
        # columns with join, so each thread draws only the call its columns need (a [128]-wide draw
        # with counter col // 4 would be repeated per column).
        calls = (first_group * RADEMACHER_CALLS_TL + tl.arange(0, RADEMACHER_CALLS_TL)).to(tl.uint32)
        w0, w1, w2, w3 = tl.randint4x(seed, calls)
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [128])  # column 4 l + k: word k of call l
        bit = tl.arange(0, 32)[:, None].to(tl.uint32)
        sign_bit = ((words[None, :] >> bit) & 1) << 31
        z = (sign_bit | 0x3F800000).to(tl.float32, bitcast=True)  # -1.0 if the bit is set, else +1.0
    else:
        # One group: 128 calls, a [256, 4] tile whose row h * 128 + g holds words 2h, 2h + 1 of call g.  With
        # 4 warps a thread owns rows t and t + 128 (the layout Triton gives 4-wide float32 loads), so each
        # thread draws one call for its 8 elements and no value moves between threads.
        tl.static_assert(TILE_SIZE == NORMAL_GROUP_TL)
        CALLS: tl.constexpr = NORMAL_CALLS_TL
        w0, w1, w2, w3 = tl.randint4x(seed, (first_group * CALLS + tl.arange(0, CALLS)).to(tl.uint32))
        a0, b0 = normal_pair(w0)
        a1, b1 = normal_pair(w1)
        a2, b2 = normal_pair(w2)
        a3, b3 = normal_pair(w3)
        # join, not a broadcast-and-select, keeps a call's outputs in one thread (with a select, Triton 3.6
        # replicated each row's Philox call across the threads of the row).  join stacks along a new last
        # axis, so join(join(a, c), join(b, d)) flattens to a, b, c, d.
        low = tl.join(tl.join(a0, a1), tl.join(b0, b1))  # [call, 4]: a0 b0 a1 b1
        high = tl.join(tl.join(a2, a3), tl.join(b2, b3))
        z = tl.reshape(tl.permute(tl.join(low, high), (3, 0, 1, 2)), [2 * CALLS, 4])  # [half, call, 4]
    return z


@triton.jit
def tile_positions(first_group, lead, GROUP: tl.constexpr, TILE_SIZE: tl.constexpr, WIDE: tl.constexpr):
    """For this program: the buffer index of each element of its tile (``[256, 4]`` for normal
    directions, GROUP = TILE_SIZE = 1024; ``[32, 128]`` for Rademacher ones, GROUP = TILE_SIZE = 4096), and the
    tile's first group (see ``tile_launch``).  Indices < 0 are the lead, masked off.  Indices are int64
    only when a buffer needs them (WIDE): int32 index math is half the instructions."""
    COLS: tl.constexpr = 4 if GROUP == NORMAL_GROUP_TL else 128  # rows of a normal / Rademacher tile
    ROWS: tl.constexpr = TILE_SIZE // COLS
    if WIDE:
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    else:
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pos = row[:, None] * COLS + tl.arange(0, COLS)[None, :] - lead
    return pos, first_group + tl.program_id(0) * (TILE_SIZE // GROUP)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "seed_index", "first_group"])
def philox_direction_kernel(
    out_ptr,  # *fp32 [n]: receives z[offset : offset + n]
    seed_ptr,  # *int64 [1]: the seed when SEED_IN_MEMORY (else unused)
    n,  # number of elements to write
    seed_lo,  # low 31 bits of a host seed
    seed_hi,  # seed >> 31 of a host seed
    seed_index,  # added to the seed (kernel_seed)
    first_group,  # offset // GROUP: the Philox group holding element `offset`
    lead,  # offset % GROUP: elements of the first group before out[0]
    SEED_IN_MEMORY: tl.constexpr,  # read the seed from seed_ptr (replayable launches)
    RADEMACHER: tl.constexpr,  # False: N(0, 1); True: ±1
    GROUP: tl.constexpr,  # elements per group: 1024 (normal: 128 Philox calls) or 4096 (Rademacher: 32 calls)
    TILE_SIZE: tl.constexpr,  # elements per program (= GROUP)
    WIDE: tl.constexpr,  # int64 element indices (buffers of 2**31 elements or more)
):
    """out[i] = z_seed[offset + i]."""
    pos, group = tile_positions(first_group, lead, GROUP, TILE_SIZE, WIDE)
    z = direction_tile(
        kernel_seed(seed_ptr, seed_lo, seed_hi, seed_index, SEED_IN_MEMORY), group, TILE_SIZE, RADEMACHER
    )
    tl.store(out_ptr + pos, z, mask=(pos >= 0) & (pos < n))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "seed_index", "offset"])
def philox_bits_kernel(
    out_ptr,  # *int32 [n, 4]: the four Philox words of each counter
    seed_ptr,  # *int64 [1]: the seed when SEED_IN_MEMORY (else unused)
    n,  # number of counters
    seed_lo,  # low 31 bits of a host seed
    seed_hi,  # seed >> 31 of a host seed
    seed_index,  # added to the seed (kernel_seed)
    offset,  # first counter
    SEED_IN_MEMORY: tl.constexpr,  # read the seed from seed_ptr (replayable launches)
    TILE_SIZE: tl.constexpr,  # counters per program
):
    """The raw Philox4x32-10 words: random bits for tests, and for the trainer's augmentation draws."""
    pos = tl.program_id(0).to(tl.int64) * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = pos < n
    seed = kernel_seed(seed_ptr, seed_lo, seed_hi, seed_index, SEED_IN_MEMORY)
    b0, b1, b2, b3 = tl.randint4x(seed, (pos + offset).to(tl.uint32))
    tl.store(out_ptr + 4 * pos + 0, b0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * pos + 1, b1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * pos + 2, b2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * pos + 3, b3.to(tl.int32, bitcast=True), mask=mask)


# --------------------------------------------------------------------------------------------------
# Torch twin
# --------------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def round_keys(seed: int) -> list[tuple[int, int]]:
    """The ten (k0, k1) round keys of Philox4x32-10 under the key ``(seed mod 2**32, seed >> 32)``."""
    k0, k1, keys = seed & _MASK32, (seed >> 32) & _MASK32, []
    for _ in range(PHILOX_ROUNDS):
        keys.append((k0, k1))
        k0, k1 = (k0 + PHILOX_KEY_A) & _MASK32, (k1 + PHILOX_KEY_B) & _MASK32
    return keys


def philox4x32_torch(seed: int, c0: torch.Tensor, c1=None, c2=None, c3=None, keys=None) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the counter block ``(c0, c1, c2, c3)`` (uint32 values held in int64; omitted
    words are 0) under the key ``(seed mod 2**32, seed >> 32)``.  With only ``c0`` this is Triton's
    ``randint4x(seed, c0)`` for 32-bit counters.  Returns four int64 tensors of uint32 values.
    ``keys``: the round keys if already known (a ``[10, 2]`` int64 tensor in the compiled twin, so that
    a new seed is new data, not a new program); ``seed`` is then unused.

    A round is ``c0, c1, c2, c3 = hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)``.  The 64-bit
    products of two uint32 values may pass 2**63: torch's int64 multiply wraps modulo 2**64 on CPU and
    CUDA, so the bit pattern is still the exact product (guarded by the known-answer tests).  The low
    words are kept as whole products: only their low 32 bits reach the next round's XOR, whose one mask
    clears everything above, so no round masks them separately (the twin's CPU time is these ops)."""
    keys = round_keys(seed) if keys is None else keys
    zeros = torch.zeros_like(c0)
    c1, c2, c3 = (zeros if c is None else c for c in (c1, c2, c3))
    for k0, k1 in keys:
        product_b, product_a = c2 * PHILOX_ROUND_B, c0 * PHILOX_ROUND_A
        c0 = product_b >> 32
        c0 ^= c1
        c0 ^= k0
        c0 &= _MASK32
        c2 = product_a >> 32
        c2 ^= c3
        c2 ^= k1
        c2 &= _MASK32
        c1, c3 = product_b, product_a
    return c0, c1 & _MASK32, c2, c3 & _MASK32


_SIGN = -(2**31)  # int32 with only the sign bit set


def _horner_(x: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """c0 + x (c1 + x (... + x c_n)) in float32, innermost first, as the kernels write it (a new tensor,
    updated in place: the twin's CPU time is op count and allocations)."""
    acc = x * coefficients[-1]
    for c in reversed(coefficients[1:-1]):
        acc += c
        acc *= x
    acc += coefficients[0]
    return acc


def normal_pair_torch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`normal_pair` (with :func:`half_radius` inline), on int32 words (uint32 bit patterns):
    the same integer and IEEE float32 operations in the same order."""
    v = (w >> 15) & 0xFFFE  # the mask also clears the sign bits an arithmetic int32 shift brings in
    v |= 1
    bits = v.to(torch.float32).view(torch.int32)
    k = bits - SQRT_HALF_BITS.value
    k >>= 23
    f = (bits - (k << 23)).view(torch.float32)
    f -= 1.0
    log1p_f = _horner_(f, LOG_C)  # ln(1 + f) = f + f (f (L0 + f (L1 + ...)))
    log1p_f *= f
    log1p_f *= f
    log1p_f += f
    k = (16 - k).to(torch.float32)
    k *= LN2.value
    r = sqrt_rn_torch(k - log1p_f)
    y = (w << 17) | (1 << 16)
    y = y.to(torch.float32)
    y *= TWO_M31.value
    t = y * y
    cos = _horner_(t, [1.0, *COS_C])
    sin = _horner_(t, SIN_C)
    sin *= y
    z0 = cos - sin
    z0 *= r
    z1 = cos + sin  # cos + sin = sin + cos: IEEE addition commutes
    z1 *= r
    z0 = z0.view(torch.int32)
    z0 ^= w & _SIGN
    z1 = z1.view(torch.int32)
    z1 ^= (w << 16) & _SIGN
    return z0.view(torch.float32), z1.view(torch.float32)


def normal_pairs_torch(counters: torch.Tensor, keys) -> tuple[torch.Tensor, torch.Tensor]:
    """The two outputs ``[calls, 4]`` of every word of the Philox calls ``counters`` (the twin's work)."""
    words = torch.stack(philox4x32_torch(0, counters, keys=keys), dim=1).to(torch.int32)  # uint32 bits, wrapped
    return normal_pair_torch(words)


#: The compiled twin.  On CPU, ``normal_pairs_torch`` runs through ``torch.compile`` (Inductor's C++ backend:
#: one fused loop instead of ~160 elementwise ops; C++ is built with -ffp-contract=off and no unsafe math,
#: so each IEEE operation still rounds once, in the same order).  One program with a dynamic number of
#: calls serves every size (static sizes ran ~1.5x faster but meant a program per size, or padding), and
#: the round keys are a tensor, so a new seed is not a new program.  Before first use the program must
#: reproduce the eager twin bit for bit on a probe; otherwise, or without a working compiler, or with
#: SUBGRAD_COMPILE_TWIN=0, the eager twin runs (one warning says why).
COMPILED_MIN_CALLS = 1 << 12
_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()  # torch.compile is not thread-safe: one compile, and one call at a time


def _compiled_normal_pairs():
    """The compiled ``normal_pairs_torch``, or None (decided once per process)."""
    with _COMPILED_LOCK:
        return _compile_once()


def _compile_once():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = None
        if os.environ.get("SUBGRAD_COMPILE_TWIN", "1") != "0":
            # torch's C++ builder logs a CUDA_HOME warning on CUDA builds of torch without a GPU: not ours
            cpp_log = logging.getLogger("torch.utils.cpp_extension")
            level = cpp_log.level
            cpp_log.setLevel(logging.ERROR)
            try:
                fn = torch.compile(normal_pairs_torch, dynamic=True)
                probe = torch.arange(7 * COMPILED_MIN_CALLS, 8 * COMPILED_MIN_CALLS, dtype=torch.int64)
                keys = round_keys(2**40 + 12345)
                got, want = fn(probe, torch.tensor(keys)), normal_pairs_torch(probe, keys)
                if all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want)):
                    _COMPILED["fn"] = fn
                else:
                    warnings.warn(
                        "subgrad: the compiled CPU twin differs from the eager twin on its probe; "
                        "using the eager twin (same bits, slower)",
                        stacklevel=2,
                    )
            except Exception as error:  # no compiler, unsupported platform, ...: the eager twin is always right
                warnings.warn(
                    f"subgrad: torch.compile of the CPU twin failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); using the eager twin",
                    stacklevel=2,
                )
            finally:
                cpp_log.setLevel(level)
    return _COMPILED["fn"]


def prepare_cpu_twin() -> bool:
    """Build (or load from torch's compile cache) the compiled CPU twin now rather than inside the first
    step that needs it.  True if it will be used; False if the eager twin runs (a warning said why)."""
    return _compiled_normal_pairs() is not None


def normal_pairs(seed: int, first_call: int, calls: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``normal_pairs_torch`` of calls ``first_call .. first_call + calls - 1``: compiled on CPU for runs
    of at least COMPILED_MIN_CALLS calls, eager otherwise (same bits either way)."""
    fn = _compiled_normal_pairs() if torch.device(device).type == "cpu" and calls >= COMPILED_MIN_CALLS else None
    if fn is None:
        return normal_pairs_torch(
            torch.arange(first_call, first_call + calls, dtype=torch.int64, device=device), round_keys(seed)
        )
    counters = torch.arange(first_call, first_call + calls, dtype=torch.int64)
    with _COMPILED_LOCK:
        return fn(counters, torch.tensor(round_keys(seed)))


#: the eight signs of each byte value, bit 0 first: a word's byte j holds bits 8j .. 8j+7 (torch tensors are
#: little-endian on every device it supports), so one table lookup per byte gives eight signs
_BYTE_SIGNS = (1 - 2 * ((torch.arange(256).view(256, 1) >> torch.arange(8).view(1, 8)) & 1)).to(torch.float32)


def direction_torch(seed: int, start: int, n: int, device, rademacher: bool) -> torch.Tensor:
    """Torch twin of :func:`direction_tile`: elements ``start .. start+n-1`` of direction ``seed``."""
    group = group_size(rademacher)
    first, stop = start // group, -(-(start + n) // group)
    if rademacher:
        w0, w1, w2, w3 = philox4x32_torch(
            seed, torch.arange(first * RADEMACHER_CALLS, stop * RADEMACHER_CALLS, dtype=torch.int64, device=device)
        )
        words = torch.stack((w0, w1, w2, w3), dim=1).to(torch.int32)  # [calls l, word k]: column 4 l + k
        signs = _BYTE_SIGNS.to(device)[words.view(torch.uint8).long()]  # [calls, word, byte j, bit i]: b = 8 j + i
        # e = 4096 G + 128 b + 4 l + k: rows b outside, columns 4 l + k inside
        z = signs.view(-1, RADEMACHER_CALLS * 4, 32).transpose(1, 2).reshape(-1)
    else:
        groups = stop - first
        z0, z1 = normal_pairs(seed, first * NORMAL_CALLS, groups * NORMAL_CALLS, device)  # [calls, word]
        z = torch.empty((groups, 2, NORMAL_CALLS, 2, 2), dtype=torch.float32, device=device)  # [G, h, g, i, s]
        halves = [t.view(groups, NORMAL_CALLS, 2, 2).transpose(1, 2) for t in (z0, z1)]  # word 2 h + i of call g
        z = torch.stack(halves, dim=4, out=z).view(-1)  # element 1024 G + 512 h + 4 g + 2 i + s
    skip = start - first * group
    return z[skip : skip + n]


#: Chunk of a materialised Rademacher direction (philox_rademacher's twin): one Philox call gives 128
#: signs, so at TWIN_CHUNK elements a chunk holds only 512 calls and per-op overhead dominates; 256K
#: elements halve the time of a 2M-element direction (6.7 vs 14.3 ms on the 2-core VM).  perturb_ keeps
#: TWIN_CHUNK, which is as fast or faster there at 1e5 and 1e6 elements.
RADEMACHER_DIRECTION_CHUNK = 1 << 18


#: Chunk of a normal direction in every twin (perturb_, zo_update_, philox_normal).  A chunk of TWIN_CHUNK
#: elements holds only 8K Philox calls, so torch's per-op overhead is most of the twin's time; at 256K
#: elements (32K calls, ~1 MB int64 temporaries) ``perturb_`` takes about 2/3 of the time at 1e5-1e7
#: elements (2-core VM, 2026-11-29: benchmarks/LOG.md).
NORMAL_DIRECTION_CHUNK = 1 << 18


def twin_chunk(rademacher: bool) -> int:
    """Elements per chunk for a twin that regenerates a direction (see the two constants above)."""
    return TWIN_CHUNK if rademacher else NORMAL_DIRECTION_CHUNK


def iter_direction_chunks(seed: int, offset: int, n: int, device, rademacher: bool, size: int = TWIN_CHUNK):
    """Yield ``(start, stop, z)`` over ``n`` elements in cache-sized chunks (see ``_common.chunks``)."""
    for start, stop in chunks(n, size):
        yield start, stop, direction_torch(seed, offset + start, stop - start, device, rademacher)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _direction(
    seed, n: int, offset: int, device, backend: str | None, rademacher: bool, seed_index: int
) -> torch.Tensor:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_direction_range(offset, n)
    out = seeded_output(seed, (n,), torch.float32, device)
    s = seed_args(seed, seed_index, 1, out)
    if resolve_backend(backend, out) == "triton":
        if n:
            t = tile_launch(offset, n, rademacher)
            philox_direction_kernel[t.grid](
                out,
                s.tensor if s.tensor is not None else out,
                n,
                s.lo,
                s.hi,
                s.index,
                t.first_group,
                t.lead,
                SEED_IN_MEMORY=s.tensor is not None,
                RADEMACHER=rademacher,
                GROUP=t.group,
                TILE_SIZE=t.tile_size,
                WIDE=t.wide,
                num_warps=t.num_warps,
                enable_fp_fusion=False,
            )
    else:
        size = RADEMACHER_DIRECTION_CHUNK if rademacher else NORMAL_DIRECTION_CHUNK
        for start, stop, z in iter_direction_chunks(
            seed_value(seed, seed_index), offset, n, out.device, rademacher, size
        ):
            out[start:stop] = z
    return out


def philox_normal(
    seed: int | torch.Tensor, n: int, offset: int = 0, device=None, backend: str | None = None, *, seed_index: int = 0
) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the standard-normal direction named by ``seed + seed_index``
    (float32).

    Eight normals per Philox call (map in the module docstring); bit-identical across backends and
    devices.  ``seed``: an int in [0, 2**62), or a 1-element int64 tensor on ``device`` that the kernel
    reads (so a replayed launch draws the current step's direction); ``offset + n <= 2**32``.
    """
    return _direction(seed, n, offset, device, backend, rademacher=False, seed_index=seed_index)


def philox_rademacher(
    seed: int | torch.Tensor, n: int, offset: int = 0, device=None, backend: str | None = None, *, seed_index: int = 0
) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the ±1 direction named by ``seed + seed_index`` (float32;
    ``seed`` as in :func:`philox_normal`): element ``4096 G + 128 b + 4 l + k`` is ``-1`` where bit ``b``
    of word ``k`` of Philox call ``32 G + l`` is set, else ``+1``."""
    return _direction(seed, n, offset, device, backend, rademacher=True, seed_index=seed_index)


def philox_bits(
    seed: int | torch.Tensor, n: int, offset: int = 0, device=None, backend: str | None = None, *, seed_index: int = 0
) -> torch.Tensor:
    """The four raw Philox words per counter, as an int32 tensor ``[n, 4]`` (uint32 bit patterns); ``seed``
    as in :func:`philox_normal`."""
    check_direction_range(offset, n)
    out = seeded_output(seed, (n, 4), torch.int32, device)
    s = seed_args(seed, seed_index, 1, out)
    if resolve_backend(backend, out) == "triton":
        if n:
            philox_bits_kernel[grid(n)](
                out,
                s.tensor if s.tensor is not None else out,
                n,
                s.lo,
                s.hi,
                s.index,
                offset,
                SEED_IN_MEMORY=s.tensor is not None,
                TILE_SIZE=TILE_SIZE,
                num_warps=NUM_WARPS,
            )
    else:
        counters = torch.arange(offset, offset + n, dtype=torch.int64, device=out.device)
        out.copy_(torch.stack(philox4x32_torch(seed_value(seed, seed_index), counters), dim=1).to(torch.int32))
    return out
