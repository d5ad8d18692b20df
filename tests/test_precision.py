"""The +eps / -2 eps / restore cycle must not let weights drift (the guarantee in kernels/zo_update.py)."""

import pytest
import torch

from conftest import assert_bitwise_equal
from subgrad.kernels import perturb_, zo_update_

EPS = 1e-3
CYCLES = 1000


def _cycle(x, seed, backend, master=None):
    """One central-difference step with lr = 0: +eps, -2 eps, then the fused restore + (zero) update."""
    if master is None:
        perturb_(x, seed, EPS, backend=backend)
        perturb_(x, seed, -2 * EPS, backend=backend)
        zo_update_(x, seed, 0.37, 0.0, restore_scale=EPS, backend=backend)
    else:
        perturb_(x, seed, EPS, backend=backend, source=master)
        perturb_(x, seed, -EPS, backend=backend, source=master)
        zo_update_(x, seed, 0.37, 0.0, master=master, backend=backend)


def test_fp32_in_place_drift_is_rounding_only(device):
    """fp32 in place: each cycle adds three roundings of half an ulp at most.  Over 1,000 cycles the
    worst element may move at most 3,000 half-ulps (1.8e-4 relative); in practice rounding errors
    cancel like a random walk, so the RMS relative drift stays at a few 1e-6."""
    x0 = torch.randn(1025, generator=torch.Generator().manual_seed(0)).to(device) + 3.0  # away from 0
    x = x0.clone()
    for step in range(CYCLES):
        _cycle(x, step, "torch")
    rel = ((x - x0) / x0).abs()
    assert rel.max().item() <= 3 * CYCLES * 2.0**-24, f"max relative drift {rel.max().item()}"
    assert rel.pow(2).mean().sqrt().item() < 1e-5, f"RMS relative drift {rel.pow(2).mean().sqrt().item()}"


def test_triton_cycles_match_twin(device):
    """The drift study above uses the twin for speed; the kernels take the identical path."""
    x0 = torch.randn(1025, generator=torch.Generator().manual_seed(1)).to(device)
    a, b = x0.clone(), x0.clone()
    for step in range(20):
        _cycle(a, step, "triton")
        _cycle(b, step, "torch")
    assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_with_master_restores_bit_identically(dtype, device):
    master = torch.randn(1025, generator=torch.Generator().manual_seed(2)).to(device)
    master0 = master.clone()
    x = master.to(dtype)
    for step in range(CYCLES):
        _cycle(x, step, "torch", master=master)
    assert_bitwise_equal(master, master0, "master after 1,000 lr=0 cycles")
    assert_bitwise_equal(x, master0.to(dtype), "model weights after 1,000 lr=0 cycles")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_naive_half_precision_in_place_does_drift(dtype, device):
    """What the master copy prevents: perturbing bf16/fp16 weights in place loses them."""
    x0 = torch.randn(1025, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    x = x0.clone()
    for step in range(100):
        _cycle(x, step, "torch")
    assert (x != x0).float().mean().item() > 0.1
