"""Kernels that read their per-step values from device memory: seeds, learning rates, Adam's step and a
skip gate (the seed kernel itself: test_seeds.py).  Each is checked Triton against twin (bit for bit),
against the same launch with host numbers (bit for bit where the arithmetic is the same; a stated bound
for Adam's float64 scalars), and for what a closed gate leaves behind.  The 70001-element cases are in the
slow tier (the interpreter takes seconds per launch there); 1 and 1023 run in the edit loop."""

import math

import pytest
import torch

from conftest import DTYPES, SIZES, assert_bitwise_equal
from subgrad.kernels import (
    adamw_step_,
    make_block_starts,
    perturb_,
    philox_normal,
    philox_rademacher,
    sgd_step_,
    step_seed,
    zo_update_,
)
from subgrad.kernels.adamw_scalars import STEP_BITS, power_torch

SEED = step_seed(11, 3)
#: the issue's sizes (1, one short of a 1024-wide block, a big odd one), the big one in the slow tier
TIERED_SIZES = [n for n in SIZES if n != 1025]


def _seed(device):
    return torch.tensor([SEED], dtype=torch.int64, device=device)


def _randn(n, device, dtype=torch.float32, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed + n)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("n", TIERED_SIZES)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_directions_from_a_tensor_seed(n, distribution, device):
    make = philox_rademacher if distribution == "rademacher" else philox_normal
    expected = make(SEED + 2, n, 5, device, backend="torch")
    for backend in ("triton", "torch"):
        assert_bitwise_equal(make(_seed(device), n, 5, backend=backend, seed_index=2), expected, backend)


@pytest.mark.parametrize("n", TIERED_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_from_a_tensor_seed(n, dtype, device):
    x = _randn(n, device, dtype)
    expected = perturb_(x.clone(), SEED + 1, 0.01, "torch", offset=3)
    for backend in ("triton", "torch"):
        got = perturb_(x.clone(), _seed(device), 0.01, backend, offset=3, seed_index=1)
        assert_bitwise_equal(got, expected, backend)


ZO_CASES = {
    "plain": dict(),  # the FOLD path
    "plain-q3": dict(num_directions=3),
    "blocks-momentum": dict(blocks=True, momentum=0.9, weight_decay=1e-3),
    "master": dict(master=True),
    "hessian": dict(blocks=True, hessian=True),
}


def _zo_args(case, n, dtype, device):
    kw = dict(ZO_CASES[case])
    q = kw.get("num_directions", 1)
    x = _randn(n, device, dtype)
    buffers = dict(x=x)
    if kw.pop("blocks", False):
        sizes = [n // 2, n - n // 2] if n > 1 else [1]
        kw["block_starts"] = make_block_starts(sizes, device)
        kw["c"] = _randn(q * len(sizes), device, seed=7)
    else:
        kw["c"] = _randn(q, device, seed=7)
    if kw.get("momentum"):
        buffers["momentum_buffer"] = _randn(n, device, seed=1)
    if kw.pop("master", False):
        buffers["master"] = x.float() + 1e-3
    if kw.pop("hessian", False):
        buffers["hessian"] = _randn(n, device, seed=2).abs() + 0.5
        kw["curvature"] = _randn(kw["c"].numel(), device, seed=3).abs()
        kw["hessian_smoothing"] = 0.1
    return buffers, kw


def _zo(case, n, dtype, device, backend, seed, lr, gate=None):
    buffers, kw = _zo_args(case, n, dtype, device)
    buffers = {k: v.clone() for k, v in buffers.items()}
    x = buffers.pop("x")
    zo_update_(x, seed, lr=lr, restore_scale=1e-3, offset=9, gate=gate, backend=backend, **buffers, **kw)
    return dict(x=x, **buffers)


@pytest.mark.parametrize("n", TIERED_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ZO_CASES))
def test_zo_update_from_device_scalars(case, n, dtype, device):
    """Tensor seed, tensor lr and an open gate: the same bits as host numbers, kernel and twin."""
    expected = _zo(case, n, dtype, device, "torch", SEED, 0.05)
    lr = torch.tensor([0.05], device=device)
    gate = torch.ones(1, dtype=torch.bool, device=device)
    for backend in ("triton", "torch"):
        got = _zo(case, n, dtype, device, backend, _seed(device), lr, gate)
        for key in expected:
            assert_bitwise_equal(got[key], expected[key], f"{key}, {backend}")


@pytest.mark.parametrize("n", TIERED_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ZO_CASES))
def test_zo_update_closed_gate_only_restores(case, n, dtype, device):
    """A closed gate, even with NaN scalars: x is restored (rewritten from the master), nothing else moves."""
    buffers, kw = _zo_args(case, n, dtype, device)
    q = kw.get("num_directions", 1)
    if "master" in buffers:
        restored = buffers["master"].to(dtype)
    else:
        restored = perturb_(buffers["x"].clone(), SEED + q - 1, 1e-3, "torch", offset=9, precond=buffers.get("hessian"))
    gate = torch.zeros(1, dtype=torch.bool, device=device)
    for backend in ("triton", "torch"):
        got = {k: v.clone() for k, v in buffers.items()}
        x = got.pop("x")
        kw_nan = dict(kw, c=torch.full_like(kw["c"], math.nan))
        zo_update_(x, _seed(device), lr=0.05, restore_scale=1e-3, offset=9, gate=gate, backend=backend, **got, **kw_nan)
        assert_bitwise_equal(x, restored, f"x, {backend}")
        for key, value in got.items():
            assert_bitwise_equal(value, buffers[key], f"{key} changed under a closed gate, {backend}")


@pytest.mark.parametrize("n", TIERED_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_from_a_tensor_lr(n, dtype, momentum, device):
    grad = _randn(n, device, dtype, seed=1)
    results = []
    for backend, lr in (
        ("torch", 0.05),
        ("triton", torch.tensor([0.05], device=device)),
        ("torch", torch.tensor(0.05, device=device)),
    ):
        param, buf = _randn(n, device, dtype), _randn(n, device, dtype, seed=2)
        sgd_step_(param, grad, buf, lr=lr, momentum=momentum, weight_decay=1e-3, backend=backend)
        results.append((param, buf))
    for param, buf in results[1:]:
        assert_bitwise_equal(param, results[0][0], "param")
        assert_bitwise_equal(buf, results[0][1], "momentum buffer")


def test_power_by_squaring_gives_the_bias_corrections_of_pow():
    """The device-scalar path's 1 - beta ** step: squaring k times multiplies the power's relative error by
    about 2**k, but the bias correction it enters stays within 1e-9 relative of Python's pow (a float32
    scalar rounds at 6e-8), at every bit length of the step."""
    for beta in (0.9, 0.999, 0.99999):
        for step in [1, 2, 3, 7, 100, 4097, 10**5, 2**STEP_BITS - 1]:
            exact = 1.0 - beta**step
            assert abs((1.0 - power_torch(beta, step)) - exact) <= 1e-9 * exact, (beta, step)


ADAM_CASES = [dict(), dict(amsgrad=True, weight_decay=0.1, betas=(0.8, 0.99)), dict(maximize=True, l1=1e-3)]


def _adam(n, dtype, device, backend, step, lr, case, gate=None):
    kw = dict(ADAM_CASES[case])
    beta1, beta2 = kw.pop("betas", (0.9, 0.999))
    param, m = _randn(n, device, dtype), _randn(n, device, dtype, seed=1)
    v, vmax = _randn(n, device, dtype, seed=2).abs(), _randn(n, device, dtype, seed=3).abs()
    adamw_step_(
        param,
        _randn(n, device, dtype, seed=4),
        m,
        v,
        vmax,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        gate=gate,
        backend=backend,
        **kw,
    )
    return dict(param=param, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=vmax)


@pytest.mark.parametrize("n", TIERED_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
@pytest.mark.parametrize("step", [1, 70001])
def test_adamw_device_scalars_kernel_matches_twin(n, dtype, case, step, device):
    step_t = torch.tensor(float(step), device=device)
    lr_t = torch.tensor([3e-3], device=device)
    gate = torch.ones(1, dtype=torch.bool, device=device)
    for kwargs in (dict(step=step_t, lr=lr_t, gate=gate), dict(step=step_t, lr=3e-3), dict(step=step, lr=lr_t)):
        a, b = (_adam(n, dtype, device, backend, case=case, **kwargs) for backend in ("triton", "torch"))
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{key}, {sorted(kwargs)}")


@pytest.mark.parametrize("n", [1023, pytest.param(70001, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
def test_adamw_device_scalars_are_the_host_ones_within_a_rounding(n, case, device):
    """float32 parameters after one step: the device path rounds the betas to float32 before the bias
    corrections, so step_size may differ by about 3e-7 relative at step 1: the weights differ by at most
    1e-6 of the update plus two float32 roundings of the weight."""
    host = _adam(n, torch.float32, device, "torch", 1, 3e-3, case)
    dev = _adam(n, torch.float32, device, "triton", torch.tensor(1.0, device=device), 3e-3, case)
    diff = (host["param"] - dev["param"]).abs()
    update = (host["param"] - _randn(n, device)).abs()  # _adam's weights before the step
    bound = 2 * torch.finfo(torch.float32).eps * host["param"].abs() + 1e-6 * update
    assert bool((diff <= bound).all()), f"worst {float(diff.max()):.3g}"
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert_bitwise_equal(dev[key], host[key], key)  # the moments do not depend on the scalars


@pytest.mark.parametrize("n", TIERED_SIZES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adamw_closed_gate_changes_nothing(n, backend, device):
    before = _adam(n, torch.float32, device, "torch", 1, 0.0, 0, gate=torch.zeros(1, dtype=torch.bool, device=device))
    after = _adam(
        n,
        torch.float32,
        device,
        backend,
        torch.tensor(3.0, device=device),
        1e-2,
        0,
        gate=torch.zeros(1, dtype=torch.bool, device=device),
    )
    for key in before:
        assert_bitwise_equal(after[key], before[key], key)


def test_bad_device_scalars_are_refused(device):
    x = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match="tensor seed must be one int64"):
        perturb_(x, torch.tensor([1.0], device=device), 0.1)
    with pytest.raises(ValueError, match="tensor lr must be one floating-point value"):
        zo_update_(x, 1, 0.1, lr=torch.tensor([1, 2.0], device=device))
    with pytest.raises(ValueError, match="gate must be one bool"):
        zo_update_(x, 1, 0.1, lr=0.1, gate=torch.ones(1, device=device))
    with pytest.raises(ValueError, match="seed_index must be an int"):
        perturb_(x, 1, 0.1, seed_index=-1)
