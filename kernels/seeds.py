"""The seed of each step's directions, advanced on the device: ``seed = step_seed(base, t); t += 1``.

A zeroth-order step draws its directions from seeds ``s_t, s_t + 1, ...`` with ``s_t`` a splitmix64 hash of
the run's seed and the step index ``t`` (:func:`step_seed`).  Keeping ``t`` and ``s_t`` in device memory,
advanced by one tiny launch per step, lets every direction kernel read ``s_t`` through a pointer: no host
value changes from one step to the next, so the step's launches replay (a CUDA graph draws new
directions at every replay) and the host never waits for the device.

    counter[0] = t  (int64, steps taken)        seed_out[0] = step_seed(base, t)  (int64, < 2**61)
    counter[0] = t + 1

One program of one lane; the 64-bit multiplications wrap modulo 2**64 in kernel and twin alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import resolve_backend, split_seed

SEED_MASK = 2**61 - 1  # step seeds leave room for seed + k < 2**62
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment and its two multipliers
_MIX_A = 0xBF58476D1CE4E5B9
_MIX_B = 0x94D049BB133111EB
_U64 = 2**64 - 1
_GOLDEN_TL: tl.constexpr = tl.constexpr(_GOLDEN)  # the same constants, for the kernel
_MIX_A_TL: tl.constexpr = tl.constexpr(_MIX_A)
_MIX_B_TL: tl.constexpr = tl.constexpr(_MIX_B)
_SEED_MASK_TL: tl.constexpr = tl.constexpr(SEED_MASK)


def step_seed(seed: int, step: int) -> int:
    """Seed of the first direction of step ``step`` (splitmix64 of the pair; directions k use +k)."""
    z = (seed * _GOLDEN + step + 1) & _U64
    z = ((z ^ (z >> 30)) * _MIX_A) & _U64
    z = ((z ^ (z >> 27)) * _MIX_B) & _U64
    return (z ^ (z >> 31)) & SEED_MASK


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def step_seed_kernel(
    counter_ptr,  # *int64 [1]: steps taken t, incremented
    seed_out_ptr,  # *int64 [1]: receives step_seed(seed, t)
    seed_lo,  # low 31 bits of the run's seed
    seed_hi,  # the run's seed >> 31
):
    step = tl.load(counter_ptr)
    seed = (seed_hi.to(tl.uint64) << 31) | seed_lo.to(tl.uint64)
    z = seed * _GOLDEN_TL + step.to(tl.uint64) + 1
    z = (z ^ (z >> 30)) * _MIX_A_TL
    z = (z ^ (z >> 27)) * _MIX_B_TL
    z = (z ^ (z >> 31)) & _SEED_MASK_TL
    tl.store(seed_out_ptr, z.to(tl.int64))
    tl.store(counter_ptr, step + 1)


def next_step_seed_(counter: torch.Tensor, seed_out: torch.Tensor, seed: int, backend: str | None = None) -> None:
    """``seed_out = step_seed(seed, counter); counter += 1``, on ``counter``'s device (both int64 ``[1]``)."""
    for name, t in (("counter", counter), ("seed_out", seed_out)):
        if t.dtype != torch.int64 or t.numel() != 1 or t.device != counter.device:
            raise ValueError(
                f"{name} must be one int64 value on {counter.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    lo, hi = split_seed(seed)
    if resolve_backend(backend, counter) == "triton":
        step_seed_kernel[(1,)](counter, seed_out, lo, hi, num_warps=1)
    else:
        step = int(counter.reshape(()))
        seed_out.fill_(step_seed(seed, step))
        counter.fill_(step + 1)
