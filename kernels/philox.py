"""Counter-based random directions: Triton's Philox4x32-10, and a torch twin with the same bits.

A direction is named by a seed and never stored: element ``i`` of direction ``seed`` is a function
of ``(seed, i)`` only, computed by whichever kernel needs it.

Bits.  ``tl.randint4x(seed, ctr)`` with a 32-bit counter ``ctr = offset + i`` runs ten Philox4x32
rounds on the counter block ``(ctr, 0, 0, 0)`` with key ``(seed mod 2**32, seed >> 32)``.
:func:`philox4x32_torch` reimplements those rounds with int64 torch ops, so the four 32-bit words are
identical on every backend and device.

Rademacher.  ``z_i = +1`` if the top bit of the first word is 0, else ``-1`` (bit-identical everywhere).

Normal.  The same Box-Muller mapping as ``tl.randn``: the first two words become uniforms
``u1, u2`` exactly as ``tl.random.uint_to_uniform_float`` does, ``u1 = max(u1, 1e-7)``, and

    z_i = sqrt(-2 ln u1) * cos(2 pi u2).

``tl.randn`` evaluates ln and cos with the platform's math library, whose float32 results differ by
an ulp between numpy (the interpreter), torch on CPU and CUDA's libdevice.  Here ln and cos are
evaluated by :func:`log_f32` / :func:`cos_2pi_f32`: fixed sequences of IEEE float32 additions,
multiplications and one correctly rounded division, with no FMA contraction (kernels launch with
``enable_fp_fusion=False``) and ``tl.sqrt_rn`` for the root.  IEEE 754 fixes the result of each of
those operations, so **normal directions are bit-identical across the Triton kernel, the torch twin,
CPU and GPU**, not merely close.  Against exact Box-Muller of the same uniforms they are within
4 float32 ulp plus 1e-6 absolute (ln/cos polynomial error, tested in ``tests/test_philox.py``);
against ``tl.randn`` itself they differ by about ``tl.randn``'s own error: its float32 ``2*pi*u2``
product (~2.5e-7 * r absolute) and, on GPUs, approximate cos/log; tested at <= 2e-6 * (1 + r).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_SIZE, NUM_WARPS, check_direction_range, chunks, f32, grid, resolve_backend,
                      split_seed, sqrt_rn_torch)

# --------------------------------------------------------------------------------------------------
# Constants (all exactly representable in float32, so kernel and twin multiply by the same value)
# --------------------------------------------------------------------------------------------------
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

UNIFORM_SCALE: tl.constexpr = tl.constexpr(f32(4.6566127342e-10))  # as tl.random.uint_to_uniform_float
U1_MIN: tl.constexpr = tl.constexpr(f32(1.0e-7))  # as tl.random.pair_uniform_to_normal
SQRT2: tl.constexpr = tl.constexpr(f32(math.sqrt(2.0)))
LN2_HI: tl.constexpr = tl.constexpr(f32(6.9313812256e-01))  # 0x3f317180: e * LN2_HI is exact for |e| < 128
LN2_LO: tl.constexpr = tl.constexpr(f32(math.log(2.0) - f32(6.9313812256e-01)))
# ln(1+f) = 2 atanh(s), s = f / (2 + f):  2s + s * s^2 (2/3 + s^2 (2/5 + s^2 (2/7 + s^2 2/9)))
LOG_C3: tl.constexpr = tl.constexpr(f32(2.0 / 3.0))
LOG_C5: tl.constexpr = tl.constexpr(f32(2.0 / 5.0))
LOG_C7: tl.constexpr = tl.constexpr(f32(2.0 / 7.0))
LOG_C9: tl.constexpr = tl.constexpr(f32(2.0 / 9.0))
# Taylor coefficients of cos(2 pi x) and sin(2 pi x) in t = x^2, for |x| <= 1/8 (|2 pi x| <= pi/4).
COS_C = [f32((-1) ** j * (2 * math.pi) ** (2 * j) / math.factorial(2 * j)) for j in range(6)]
SIN_C = [f32((-1) ** j * (2 * math.pi) ** (2 * j + 1) / math.factorial(2 * j + 1)) for j in range(6)]
COS_C1: tl.constexpr = tl.constexpr(COS_C[1])
COS_C2: tl.constexpr = tl.constexpr(COS_C[2])
COS_C3: tl.constexpr = tl.constexpr(COS_C[3])
COS_C4: tl.constexpr = tl.constexpr(COS_C[4])
COS_C5: tl.constexpr = tl.constexpr(COS_C[5])
SIN_C0: tl.constexpr = tl.constexpr(SIN_C[0])
SIN_C1: tl.constexpr = tl.constexpr(SIN_C[1])
SIN_C2: tl.constexpr = tl.constexpr(SIN_C[2])
SIN_C3: tl.constexpr = tl.constexpr(SIN_C[3])
SIN_C4: tl.constexpr = tl.constexpr(SIN_C[4])
SIN_C5: tl.constexpr = tl.constexpr(SIN_C[5])

DISTRIBUTIONS = ("gaussian", "rademacher")


def is_rademacher(distribution: str) -> bool:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution == "rademacher"


# --------------------------------------------------------------------------------------------------
# Triton device functions (used by every kernel that needs z)
# --------------------------------------------------------------------------------------------------
@triton.jit
def philox_seed(seed_lo, seed_hi):
    """Rebuild the 62-bit seed from its two non-negative int32 halves (see ``split_seed``)."""
    return (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)


@triton.jit
def direction_counter(pos, offset):
    """32-bit Philox counter of element ``pos`` (int64) of a direction starting at ``offset``."""
    return (pos + offset).to(tl.uint32)


@triton.jit
def uniform_from_bits(bits):
    """uint32 -> float32 in [0, 1), bit for bit as ``tl.random.uint_to_uniform_float``."""
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def log_f32(u):
    """Natural log of a positive normal float32 from IEEE add/mul/div only (< 2 ulp error)."""
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # mantissa in [1, 2)
    big = m > SQRT2
    m = tl.where(big, m * 0.5, m)  # now m in [sqrt(2)/2, sqrt(2)]
    e = tl.where(big, e + 1, e)
    f = m - 1.0  # exact (Sterbenz)
    s = tl.math.div_rn(f, f + 2.0)
    s2 = s * s
    p = s2 * (LOG_C3 + s2 * (LOG_C5 + s2 * (LOG_C7 + s2 * LOG_C9)))
    log1p_f = (s + s) + s * p
    ef = e.to(tl.float32)
    return ef * LN2_HI + (ef * LN2_LO + log1p_f)


@triton.jit
def cos_2pi_f32(u):
    """cos(2 pi u) for u in [0, 1) from IEEE add/mul only: exact quarter-turn reduction of u itself,
    then Taylor polynomials of cos/sin on |2 pi x| <= pi/4 (abs. error < 2e-7)."""
    k = (u * 4.0 + 0.5).to(tl.int32)  # nearest quarter turn, 0..4
    x = u - k.to(tl.float32) * 0.25  # exact, |x| <= 1/8
    t = x * x
    c = 1.0 + t * (COS_C1 + t * (COS_C2 + t * (COS_C3 + t * (COS_C4 + t * COS_C5))))
    s = x * (SIN_C0 + t * (SIN_C1 + t * (SIN_C2 + t * (SIN_C3 + t * (SIN_C4 + t * SIN_C5)))))
    q = k & 3
    return tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))


@triton.jit
def direction(seed, ctr, RADEMACHER: tl.constexpr):
    """Element ``ctr`` of direction ``seed``: ±1 (Rademacher) or N(0, 1) (Box-Muller as tl.randn)."""
    b1, b2, _, _ = tl.randint4x(seed, ctr)
    if RADEMACHER:
        z = tl.where((b1 >> 31) == 0, 1.0, -1.0)
    else:
        u1 = tl.maximum(uniform_from_bits(b1), U1_MIN)
        u2 = uniform_from_bits(b2)
        z = tl.sqrt_rn(-2.0 * log_f32(u1)) * cos_2pi_f32(u2)
    return z


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def philox_direction_kernel(
    out_ptr,  # *fp32 [n]: receives z[offset : offset + n]
    n,  # number of elements to write
    seed_lo,  # low 31 bits of the seed
    seed_hi,  # seed >> 31
    offset,  # index of the first element within the direction
    RADEMACHER: tl.constexpr,  # False: N(0, 1); True: ±1
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    """out[i] = z_seed[offset + i]."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = pos < n
    z = direction(philox_seed(seed_lo, seed_hi), direction_counter(pos, offset), RADEMACHER)
    tl.store(out_ptr + pos, z, mask=mask)


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
    b0, b1, b2, b3 = tl.randint4x(philox_seed(seed_lo, seed_hi), direction_counter(pos, offset))
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


def uniform_from_bits_torch(bits: torch.Tensor) -> torch.Tensor:
    x = bits.to(torch.int32)  # int64 -> int32 wraps, i.e. a bitcast of the uint32 value
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * UNIFORM_SCALE.value


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
    p = s2 * (LOG_C3.value + s2 * (LOG_C5.value + s2 * (LOG_C7.value + s2 * LOG_C9.value)))
    log1p_f = (s + s) + s * p
    ef = e.to(torch.float32)
    return ef * LN2_HI.value + (ef * LN2_LO.value + log1p_f)


def cos_2pi_f32_torch(u: torch.Tensor) -> torch.Tensor:
    k = (u * 4.0 + 0.5).to(torch.int32)
    x = u - k.to(torch.float32) * 0.25
    t = x * x
    c = 1.0 + t * (COS_C[1] + t * (COS_C[2] + t * (COS_C[3] + t * (COS_C[4] + t * COS_C[5]))))
    s = x * (SIN_C[0] + t * (SIN_C[1] + t * (SIN_C[2] + t * (SIN_C[3] + t * (SIN_C[4] + t * SIN_C[5])))))
    q = k & 3
    return torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))


def direction_torch(seed: int, start: int, n: int, device, rademacher: bool) -> torch.Tensor:
    """Torch twin of :func:`direction`: elements ``start .. start+n-1`` of direction ``seed``."""
    counters = torch.arange(start, start + n, dtype=torch.int64, device=device)
    b1, b2, _, _ = philox4x32_torch(seed, counters)
    if rademacher:
        return torch.where((b1 >> 31) == 0, 1.0, -1.0).to(torch.float32)
    u1 = torch.clamp_min(uniform_from_bits_torch(b1), U1_MIN.value)
    u2 = uniform_from_bits_torch(b2)
    return sqrt_rn_torch(-2.0 * log_f32_torch(u1)) * cos_2pi_f32_torch(u2)


def iter_direction_chunks(seed: int, offset: int, n: int, device, rademacher: bool):
    """Yield ``(start, stop, z)`` over ``n`` elements in cache-sized chunks (see ``_common.chunks``)."""
    for start, stop in chunks(n):
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
            philox_direction_kernel[grid(n)](out, n, seed_lo, seed_hi, offset, RADEMACHER=rademacher,
                                             BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS,
                                             enable_fp_fusion=False)
    else:
        for start, stop, z in iter_direction_chunks(seed, offset, n, device, rademacher):
            out[start:stop] = z
    return out


def philox_normal(seed: int, n: int, offset: int = 0, device=None, backend: str | None = None) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the standard-normal direction named by ``seed`` (float32).

    The same Philox stream and Box-Muller mapping as ``tl.randn(seed, offset + i)``; bit-identical
    across backends and devices (see module docstring).  ``seed`` in [0, 2**62), ``offset + n <= 2**32``.
    """
    return _direction(seed, n, offset, device, backend, rademacher=False)


def philox_rademacher(seed: int, n: int, offset: int = 0, device=None, backend: str | None = None) -> torch.Tensor:
    """Elements ``offset .. offset+n-1`` of the ±1 direction named by ``seed`` (float32): ``+1`` where
    the top bit of the first Philox word of ``tl.randint4x(seed, offset + i)`` is 0."""
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
