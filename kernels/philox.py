"""Counter-based random directions: Philox4x32-10 with every output word used, and a torch twin with
the same bits.

A direction is named by a seed and never stored: element ``e`` of direction ``seed`` is a function of
``(seed, e)`` only, computed by whichever kernel needs it.

Bits.  ``tl.randint4x(seed, g)`` with a 32-bit counter ``g`` runs ten Philox4x32 rounds on the counter
block ``(g, 0, 0, 0)`` with key ``(seed mod 2**32, seed >> 32)`` and returns four 32-bit words
``w0..w3``.  :func:`philox4x32_torch` reimplements those rounds with int64 torch ops (it matches
Random123's published known-answer vectors), so the words are identical on every backend and device.

The direction map (one Philox call feeds a whole group of neighbouring elements; no word is wasted):

* **Normal**: groups of 4.  Element ``e = 4 g + j`` comes from call ``g``.  Each word gives a 24-bit
  uniform: radius uniforms ``u0, u2 = ((w >> 8) | 1) 2**-24`` in (0, 1) (never 0, so no floor is
  needed), angles ``a1, a3 = (w >> 8) 2**-24`` in [0, 1), both exact in float32; radii
  ``r0 = sqrt(-2 ln u0)``, ``r1 = sqrt(-2 ln u2)`` (at most 5.77), and both outputs of each pair:

      z[4g] = r0 cos(2 pi a1),  z[4g+1] = r0 sin(2 pi a1),  z[4g+2] = r1 cos(2 pi a3),  z[4g+3] = r1 sin(2 pi a3)

  so four normals cost one Philox call, two logs, two roots and two sin/cos pairs that share one
  argument reduction.  Cosine and sine of one angle are exactly uncorrelated and independent for
  Box-Muller (tested, with the other neighbour pairs and seed vs seed + 1).
* **Rademacher**: groups of 4096 elements from 32 calls.  Element ``e = 4096 G + 128 b + 4 l + k`` is ``-1``
  if bit ``b`` of word ``w_k`` of call ``32 G + l`` is set, else ``+1``: all 128 bits of a call are signs.
  Read as a ``[32, 128]`` tile (row ``b``, column ``4 l + k``), call ``l`` feeds one 4-wide column strip, so
  the GPU thread that owns those four columns draws the call once and takes a bit of it per row: one
  Philox call per 32 elements a thread handles, where a map with a call per row would cost one per 4.

This map is not ``tl.randn``'s (one call per element, three words discarded); it replaced it in issue 11
because direction generation, not memory, bounded every zeroth-order kernel (benchmarks/README.md).

Bit-identical normals.  ln, cos and sin are evaluated by :func:`log_f32` / :func:`sincos_2pi`: integer
ops and fixed sequences of IEEE float32 additions, multiplications and one correctly rounded division, with no
FMA contraction (kernels launch with ``enable_fp_fusion=False``) and ``tl.sqrt_rn`` for the root.  IEEE
754 fixes the result of each of those operations, so **normal directions are bit-identical across the
Triton kernel, the torch twin, CPU and GPU**, not merely close.  Against float64 Box-Muller of the same
uniforms they are within max(4 float32 ulp, 5e-7) (tested in ``tests/test_philox.py``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_SIZE, NUM_WARPS, TWIN_CHUNK, check_direction_range, chunks, f32, grid, resolve_backend,
                      split_seed, sqrt_rn_torch)

# --------------------------------------------------------------------------------------------------
# Constants (all exactly representable in float32, so kernel and twin multiply by the same value)
# --------------------------------------------------------------------------------------------------
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

TWO_M24: tl.constexpr = tl.constexpr(2.0**-24)  # uniforms are 24-bit: k * 2**-24, exact in float32
SQRT2: tl.constexpr = tl.constexpr(f32(math.sqrt(2.0)))
LN2_HI: tl.constexpr = tl.constexpr(f32(6.9313812256e-01))  # 0x3f317180: e * LN2_HI is exact for |e| < 128
LN2_LO: tl.constexpr = tl.constexpr(f32(math.log(2.0) - f32(6.9313812256e-01)))
# ln(1+f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716:  2s + s * s^2 (2/3 + s^2 (2/5 + s^2 2/7)); the next
# term, 2 s^9 / 9, is below 3e-8 (the whole normal stays within the tested 4-ulp / 5e-7 bound)
LOG_C3: tl.constexpr = tl.constexpr(f32(2.0 / 3.0))
LOG_C5: tl.constexpr = tl.constexpr(f32(2.0 / 5.0))
LOG_C7: tl.constexpr = tl.constexpr(f32(2.0 / 7.0))
# Taylor coefficients of cos(2 pi x) and sin(2 pi x) in t = x^2, for |x| <= 1/8 (|2 pi x| <= pi/4), to
# x^8 and x^9: truncation error (pi/4)^10 / 10! = 2.5e-8 and (pi/4)^11 / 11! = 1.8e-9, under an ulp of 0.7.
COS_C = [f32((-1) ** j * (2 * math.pi) ** (2 * j) / math.factorial(2 * j)) for j in range(5)]
SIN_C = [f32((-1) ** j * (2 * math.pi) ** (2 * j + 1) / math.factorial(2 * j + 1)) for j in range(5)]
COS_C1: tl.constexpr = tl.constexpr(COS_C[1])
COS_C2: tl.constexpr = tl.constexpr(COS_C[2])
COS_C3: tl.constexpr = tl.constexpr(COS_C[3])
COS_C4: tl.constexpr = tl.constexpr(COS_C[4])
SIN_C0: tl.constexpr = tl.constexpr(SIN_C[0])
SIN_C1: tl.constexpr = tl.constexpr(SIN_C[1])
SIN_C2: tl.constexpr = tl.constexpr(SIN_C[2])
SIN_C3: tl.constexpr = tl.constexpr(SIN_C[3])
SIN_C4: tl.constexpr = tl.constexpr(SIN_C[4])

DISTRIBUTIONS = ("gaussian", "rademacher")
NORMAL_GROUP = 4  # elements per Philox call in a normal direction (two Box-Muller pairs)
RADEMACHER_CALLS = 32  # Philox calls per Rademacher group: one per 4-wide column strip of the tile
RADEMACHER_GROUP = 128 * RADEMACHER_CALLS  # elements per Rademacher group: a [32 bits, 128 columns] tile
RADEMACHER_CALLS_TL: tl.constexpr = tl.constexpr(RADEMACHER_CALLS)


def is_rademacher(distribution: str) -> bool:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution == "rademacher"


def group_size(rademacher: bool) -> int:
    """Elements of a direction in one group: one Philox call (normal) or one [32, 128] tile of 32 calls
    (Rademacher).  Kernels tile whole groups; an offset inside a group is masked off."""
    return RADEMACHER_GROUP if rademacher else NORMAL_GROUP


class TileLaunch(NamedTuple):
    """How a kernel walks ``n`` elements of a direction from element ``offset`` on (see ``tile_launch``)."""
    grid: tuple[int]  # programs
    first_group: int  # offset // GROUP: the group holding element ``offset``
    lead: int  # offset % GROUP: elements of the first group before the buffer starts (masked off)
    group: int  # GROUP: elements per group
    block_size: int  # BLOCK_SIZE: elements per program, whole groups
    num_warps: int
    wide: bool  # element indices need 64 bits


def tile_launch(offset: int, n: int, rademacher: bool) -> TileLaunch:
    """Launch shape of a kernel that walks ``n`` elements starting at element ``offset`` of a direction.

    Programs cover whole groups: program ``p`` starts at group ``first_group + p * BLOCK_SIZE // GROUP``,
    and the buffer starts ``lead`` elements into the first group.  A normal program is 1024 elements
    (256 Philox calls) on 4 warps; a Rademacher program is one group, 4096 elements, on 8 warps, so a
    thread handles 16 elements, all from one Philox call (4 warps would halve the calls per element
    but double the registers per thread: 132 instead of 72 for zo_update_).
    """
    group = group_size(rademacher)
    block = RADEMACHER_GROUP if rademacher else BLOCK_SIZE
    first_group, lead = divmod(offset, group)
    programs = max(1, math.ceil((n + lead) / block))
    return TileLaunch((programs,), first_group, lead, group, block, 8 if rademacher else NUM_WARPS,
                      programs * block >= 2**31)


# --------------------------------------------------------------------------------------------------
# Triton device functions (used by every kernel that needs z)
# --------------------------------------------------------------------------------------------------
@triton.jit
def philox_seed(seed_lo, seed_hi):
    """Rebuild the 62-bit seed from its two non-negative int32 halves (see ``split_seed``)."""
    return (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)


@triton.jit
def radius_uniform(bits):
    """uint32 -> float32 u in (0, 1): the top 24 bits with the lowest forced to 1, times 2**-24 (exact).
    Never 0 or 1, so ln u is finite and negative without a floor."""
    return ((bits >> 8) | 1).to(tl.float32) * TWO_M24


@triton.jit
def log_f32(u):
    """Natural log of a positive normal float32 from IEEE add/mul/div only (measured <= 2.6 ulp on the
    radius uniforms)."""
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # mantissa in [1, 2)
    big = m > SQRT2
    m = tl.where(big, m * 0.5, m)  # now m in [sqrt(2)/2, sqrt(2)]
    e = tl.where(big, e + 1, e)
    f = m - 1.0  # exact (Sterbenz)
    s = tl.math.div_rn(f, f + 2.0)
    s2 = s * s
    p = s2 * (LOG_C3 + s2 * (LOG_C5 + s2 * LOG_C7))
    log1p_f = (s + s) + s * p
    ef = e.to(tl.float32)
    return ef * LN2_HI + (ef * LN2_LO + log1p_f)


@triton.jit
def sincos_2pi(bits):
    """(cos(2 pi u), sin(2 pi u)) of the angle u = (bits >> 8) * 2**-24 in [0, 1), from integer ops and
    IEEE float32 add/mul only: the quarter-turn reduction is done on the 24-bit integer (exact), then
    Taylor polynomials of cos and sin on |2 pi x| <= pi/4 (abs. error < 1e-7)."""
    a = (bits >> 8) + (1 << 21)  # u + 1/8, in units of 2**-24
    q = (a >> 22) & 3  # nearest quarter turn (4 == 0)
    x = ((a & 0x3FFFFF).to(tl.int32) - (1 << 21)).to(tl.float32) * TWO_M24  # u - quarter, in [-1/8, 1/8)
    t = x * x
    c = 1.0 + t * (COS_C1 + t * (COS_C2 + t * (COS_C3 + t * COS_C4)))
    s = x * (SIN_C0 + t * (SIN_C1 + t * (SIN_C2 + t * (SIN_C3 + t * SIN_C4))))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    return cos, sin


@triton.jit
def box_muller_radius(bits):
    """sqrt(-2 ln u), u = radius_uniform(bits): at most sqrt(48 ln 2) = 5.77."""
    return tl.sqrt_rn(-2.0 * log_f32(radius_uniform(bits)))


@triton.jit
def direction_tile(seed, first_group, BLOCK_SIZE: tl.constexpr, RADEMACHER: tl.constexpr):
    """This program's ``BLOCK_SIZE`` elements of direction ``seed`` from group ``first_group`` on, as a
    float32 tile shaped like :func:`tile_positions`'s (see the module docstring for the map):

    * normal: ``[BLOCK_SIZE // 4, 4]``, row r = Philox call ``first_group + r`` (four normals);
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
        ROWS: tl.constexpr = BLOCK_SIZE // 4
        w0, w1, w2, w3 = tl.randint4x(seed, (first_group + tl.arange(0, ROWS)).to(tl.uint32))
        r0 = box_muller_radius(w0)
        c0, s0 = sincos_2pi(w1)
        r1 = box_muller_radius(w2)
        c1, s1 = sincos_2pi(w3)
        # join, not a broadcast-and-select: the four outputs of a call land in one thread, whatever
        # layout the compiler picks for the tile (with a select, Triton 3.6 replicated each row's Philox
        # call across the threads of the row)
        # (join stacks along a new last axis, so join(join(a, c), join(b, d)) flattens to a, b, c, d)
        z = tl.reshape(tl.join(tl.join(r0 * c0, r1 * c1), tl.join(r0 * s0, r1 * s1)), [ROWS, 4])
    return z


@triton.jit
def tile_positions(first_group, lead, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, WIDE: tl.constexpr):
    """For this program: the buffer index of each element of its tile (``[BLOCK_SIZE // 4, 4]`` for
    normal directions, GROUP = 4; ``[32, 128]`` for Rademacher ones, GROUP = BLOCK_SIZE = 4096), and the
    tile's first group (see ``tile_launch``).  Indices < 0 are the lead, masked off.  Indices are int64
    only when a buffer needs them (WIDE): int32 index math is half the instructions."""
    COLS: tl.constexpr = 4 if GROUP == 4 else 128  # a normal group is one row; a Rademacher group 32 rows
    ROWS: tl.constexpr = BLOCK_SIZE // COLS
    if WIDE:
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    else:
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pos = row[:, None] * COLS + tl.arange(0, COLS)[None, :] - lead
    return pos, first_group + tl.program_id(0) * (BLOCK_SIZE // GROUP)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "first_group"])
def philox_direction_kernel(
    out_ptr,  # *fp32 [n]: receives z[offset : offset + n]
    n,  # number of elements to write
    seed_lo,  # low 31 bits of the seed
    seed_hi,  # seed >> 31
    first_group,  # offset // GROUP: the Philox group holding element `offset`
    lead,  # offset % GROUP: elements of the first group before out[0]
    RADEMACHER: tl.constexpr,  # False: N(0, 1); True: ±1
    GROUP: tl.constexpr,  # elements per group: 4 (normal: one Philox call) or 4096 (Rademacher: 32 calls)
    BLOCK_SIZE: tl.constexpr,  # elements per program (a multiple of GROUP)
    WIDE: tl.constexpr,  # int64 element indices (buffers of 2**31 elements or more)
):
    """out[i] = z_seed[offset + i]."""
    pos, group = tile_positions(first_group, lead, GROUP, BLOCK_SIZE, WIDE)
    z = direction_tile(philox_seed(seed_lo, seed_hi), group, BLOCK_SIZE, RADEMACHER)
    tl.store(out_ptr + pos, z, mask=(pos >= 0) & (pos < n))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def philox_bits_kernel(
    out_ptr,  # *int32 [n, 4]: the four Philox words of each counter
    n,  # number of counters
    seed_lo,  # low 31 bits of the seed
    seed_hi,  # seed >> 31
    offset,  # first counter
    BLOCK_SIZE: tl.constexpr,  # counters per program
):
    """The raw Philox4x32-10 words, so tests can compare random bits, not only directions."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = pos < n
    b0, b1, b2, b3 = tl.randint4x(philox_seed(seed_lo, seed_hi), (pos + offset).to(tl.uint32))
    tl.store(out_ptr + 4 * pos + 0, b0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * pos + 1, b1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * pos + 2, b2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * pos + 3, b3.to(tl.int32, bitcast=True), mask=mask)


# --------------------------------------------------------------------------------------------------
# Torch twin
# --------------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a uint32 constant ``a`` and uint32 values ``b`` held in
    int64.  The 64-bit product may pass 2**63; torch's int64 multiply wraps modulo 2**64 on CPU and
    CUDA, so its bit pattern is still the exact product (guarded by the known-answer tests)."""
    p = b * a
    return (p >> 32) & _MASK32, p & _MASK32


def philox4x32_torch(seed: int, c0: torch.Tensor, c1=None, c2=None, c3=None) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the counter block ``(c0, c1, c2, c3)`` (uint32 values held in int64; omitted
    words are 0) under the key ``(seed mod 2**32, seed >> 32)``.  With only ``c0`` this is Triton's
    ``randint4x(seed, c0)`` for 32-bit counters.  Returns four int64 tensors of uint32 values."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    zeros = torch.zeros_like(c0)
    c1, c2, c3 = (zeros if c is None else c for c in (c1, c2, c3))
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def radius_uniform_torch(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 8) | 1).to(torch.float32) * TWO_M24.value


def log_f32_torch(u: torch.Tensor) -> torch.Tensor:
    bits = u.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > SQRT2.value
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e)
    f = m - 1.0
    s = f / (f + 2.0)
    s2 = s * s
    p = s2 * (LOG_C3.value + s2 * (LOG_C5.value + s2 * LOG_C7.value))
    log1p_f = (s + s) + s * p
    ef = e.to(torch.float32)
    return ef * LN2_HI.value + (ef * LN2_LO.value + log1p_f)


def sincos_2pi_torch(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = (bits >> 8) + (1 << 21)
    q = (a >> 22) & 3
    x = ((a & 0x3FFFFF) - (1 << 21)).to(torch.float32) * TWO_M24.value
    t = x * x
    c = 1.0 + t * (COS_C[1] + t * (COS_C[2] + t * (COS_C[3] + t * COS_C[4])))
    s = x * (SIN_C[0] + t * (SIN_C[1] + t * (SIN_C[2] + t * (SIN_C[3] + t * SIN_C[4]))))
    cos = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    sin = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    return cos, sin


def box_muller_radius_torch(bits: torch.Tensor) -> torch.Tensor:
    return sqrt_rn_torch(-2.0 * log_f32_torch(radius_uniform_torch(bits)))


_BIT_SHIFTS = torch.arange(32, dtype=torch.int64).view(1, 32, 1)  # one row per bit


def direction_torch(seed: int, start: int, n: int, device, rademacher: bool) -> torch.Tensor:
    """Torch twin of :func:`direction_tile`: elements ``start .. start+n-1`` of direction ``seed``."""
    group = group_size(rademacher)
    first, stop = start // group, -(-(start + n) // group)
    calls_per_group = RADEMACHER_CALLS if rademacher else 1
    w0, w1, w2, w3 = philox4x32_torch(seed, torch.arange(first * calls_per_group, stop * calls_per_group,
                                                         dtype=torch.int64, device=device))
    if rademacher:
        words = torch.stack((w0, w1, w2, w3), dim=1).view(-1, 1, RADEMACHER_CALLS * 4)  # [groups, 1, 4 l + k]
        bits = (words >> _BIT_SHIFTS.to(device)) & 1  # [groups, 32 bits, 128 columns]: e = 4096 G + 128 b + 4 l + k
        z = (1 - 2 * bits).to(torch.float32).reshape(-1)
    else:
        r0, r1 = box_muller_radius_torch(w0), box_muller_radius_torch(w2)
        c0, s0 = sincos_2pi_torch(w1)
        c1, s1 = sincos_2pi_torch(w3)
        z = torch.stack((r0 * c0, r0 * s0, r1 * c1, r1 * s1), dim=1).reshape(-1)
    skip = start - first * group
    return z[skip:skip + n]


#: Chunk of a materialised Rademacher direction (philox_rademacher's twin): one Philox call gives 128
#: signs, so at TWIN_CHUNK elements a chunk holds only 512 calls and per-op overhead dominates; 256K
#: elements halve the time of a 2M-element direction (6.7 vs 14.3 ms on the 2-core VM).  perturb_ keeps
#: TWIN_CHUNK, which is as fast or faster there at 1e5 and 1e6 elements.
RADEMACHER_DIRECTION_CHUNK = 1 << 18


def iter_direction_chunks(seed: int, offset: int, n: int, device, rademacher: bool, size: int = TWIN_CHUNK):
    """Yield ``(start, stop, z)`` over ``n`` elements in cache-sized chunks (see ``_common.chunks``)."""
    for start, stop in chunks(n, size):
        yield start, stop, direction_torch(seed, offset + start, stop - start, device, rademacher)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _direction(seed: int, n: int, offset: int, device, backend: str | None, rademacher: bool) -> torch.Tensor:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed_lo, seed_hi = split_seed(seed)
    check_direction_range(offset, n)
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty(n, dtype=torch.float32, device=device)
    if resolve_backend(backend, out) == "triton":
        if n:
            t = tile_launch(offset, n, rademacher)
            philox_direction_kernel[t.grid](out, n, seed_lo, seed_hi, t.first_group, t.lead, RADEMACHER=rademacher,
                                            GROUP=t.group, BLOCK_SIZE=t.block_size, WIDE=t.wide,
                                            num_warps=t.num_warps,
                                            enable_fp_fusion=False)
    else:
        size = RADEMACHER_DIRECTION_CHUNK if rademacher else TWIN_CHUNK
        for start, stop, z in iter_direction_chunks(seed, offset, n, device, rademacher, size):
            out[start:stop] = z
    return out


def philox_normal(seed: int, n: int, offset: int = 0, device=None, backend: str | None = None) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the standard-normal direction named by ``seed`` (float32).

    Four normals per Philox call (both Box-Muller outputs of two pairs; map in the module docstring);
    bit-identical across backends and devices.  ``seed`` in [0, 2**62), ``offset + n <= 2**32``.
    """
    return _direction(seed, n, offset, device, backend, rademacher=False)


def philox_rademacher(seed: int, n: int, offset: int = 0, device=None, backend: str | None = None) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the ±1 direction named by ``seed`` (float32): element
    ``4096 G + 128 b + 4 l + k`` is ``-1`` where bit ``b`` of word ``k`` of Philox call ``32 G + l`` is set,
    else ``+1``."""
    return _direction(seed, n, offset, device, backend, rademacher=True)


def philox_bits(seed: int, n: int, offset: int = 0, device=None, backend: str | None = None) -> torch.Tensor:
    """The four raw Philox words per counter, as an int32 tensor ``[n, 4]`` (uint32 bit patterns)."""
    seed_lo, seed_hi = split_seed(seed)
    check_direction_range(offset, n)
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty((n, 4), dtype=torch.int32, device=device)
    if resolve_backend(backend, out) == "triton":
        if n:
            philox_bits_kernel[grid(n)](out, n, seed_lo, seed_hi, offset, BLOCK_SIZE=BLOCK_SIZE,
                                        num_warps=NUM_WARPS)
    else:
        counters = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
        out.copy_(torch.stack(philox4x32_torch(seed, counters), dim=1).to(torch.int32))
    return out
