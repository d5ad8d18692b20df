"""perturb_: Triton vs torch twin (bit-identical) and against its definition x + scale * z."""

import pytest
import torch

from conftest import DTYPES, SIZES, assert_bitwise_equal
from subgrad.kernels import perturb_, perturb_launcher, philox_normal, philox_rademacher

#: |result - exact| allowed against the float64 definition: one rounding to the stored dtype
#: (half an ulp, relative 2**-p) plus float32 arithmetic error, relative to max(|x|, |scale z|).
REL_TOL = {torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_triton_matches_twin_and_definition(n, dtype, distribution, device):
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(device=device, dtype=dtype)
    offset, scale = 17, 0.125
    out = {
        b: perturb_(x0.clone(), 99, scale, backend=b, offset=offset, distribution=distribution)
        for b in ("triton", "torch")
    }
    assert_bitwise_equal(out["triton"], out["torch"], f"perturb_ {dtype} n={n}")
    make = philox_normal if distribution == "gaussian" else philox_rademacher
    z = make(99, n, offset, device, backend="torch").double()
    exact = x0.double() + scale * z
    err = (out["triton"].double() - exact).abs()
    bound = REL_TOL[dtype] * torch.maximum(x0.double().abs(), (scale * z).abs()) + 1e-30
    assert bool((err <= bound).all()), f"max err {err.max().item()} exceeds {REL_TOL[dtype]} relative"


@pytest.mark.parametrize("n", [1, 1025])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_source(n, dtype, device):
    master = torch.randn(n, device=device)
    x = master.to(dtype)
    out = {b: perturb_(x.clone(), 5, 1e-2, backend=b, source=master) for b in ("triton", "torch")}
    assert_bitwise_equal(out["triton"], out["torch"])
    # Perturbing by 0 from the master gives back the master rounded once: the restore is exact.
    assert_bitwise_equal(perturb_(out["triton"], 5, 0.0, backend="triton", source=master), master.to(dtype))


def test_scale_is_runtime_and_in_place(device):
    x = torch.zeros(1025, device=device)
    ptr = x.data_ptr()
    for scale in (1e-3, -2e-3, 1e-3):
        perturb_(x, 3, scale, backend="triton")
    assert x.data_ptr() == ptr and x.abs().max().item() < 1e-9


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda d: torch.zeros(8, dtype=torch.int32, device=d), "must be float32, bfloat16 or float16"),
        (lambda d: torch.zeros(4, 4, device=d).t(), "must be contiguous"),
    ],
)
def test_bad_input(make_bad, message, device):
    with pytest.raises(ValueError, match=message):
        perturb_(make_bad(device), 1, 1e-3)


def test_source_must_be_fp32(device):
    with pytest.raises(ValueError, match="master copy\\) must be float32"):
        perturb_(torch.zeros(4, device=device), 1, 1e-3, source=torch.zeros(4, device=device, dtype=torch.float16))


@pytest.mark.parametrize("n", [1, 1025, pytest.param(70001, marks=pytest.mark.slow)])
def test_preconditioned_direction(n, device):
    x0 = torch.randn(n, device=device)
    h = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(device) + 0.25
    out = {b: perturb_(x0.clone(), 6, 0.5, backend=b, precond=h) for b in ("triton", "torch")}
    assert_bitwise_equal(out["triton"], out["torch"])
    step = 0.5 * philox_normal(6, n, device=device).double() / h.double().sqrt()
    err = (out["triton"].double() - (x0.double() + step)).abs()
    # rounding of 1/sqrt(h) (2 ops), z * s, the product with scale and the sum: <= 3 ulp of the operands
    assert bool((err <= 4e-7 * (x0.double().abs() + step.abs())).all()), err.max()


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("offset", [0, 130])
def test_wide_indices_give_the_same_bits(distribution, offset, device, monkeypatch):
    """Buffers of 2**31 elements or more index in int64 (WIDE=True); forced on a small buffer, the int64
    path must give the same bits as the twin (a real 2**31-element buffer needs 8 GB)."""
    import subgrad.kernels.perturb as module

    real = module.tile_launch
    monkeypatch.setattr(module, "tile_launch", lambda *args: real(*args)._replace(wide=True))
    x0 = torch.randn(3000, generator=torch.Generator().manual_seed(3)).to(device)
    out = {
        b: perturb_(x0.clone(), 3, 0.5, backend=b, offset=offset, distribution=distribution)
        for b in ("triton", "torch")
    }
    assert_bitwise_equal(out["triton"], out["torch"], f"WIDE perturb_ {distribution} offset={offset}")


@pytest.mark.parametrize("n", [1, 1025, pytest.param(5000, marks=pytest.mark.slow)])  # 5000: several tiles
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_seed", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_launcher_equals_perturb(n, dtype, tensor_seed, backend, device):
    """perturb_launcher(...)(scale, seed_index) is perturb_(..., scale, seed_index=...) bit for bit, for each
    option it binds (a master source, a curvature preconditioner), at several calls in a row."""
    g = torch.Generator().manual_seed(n)
    master = torch.randn(n, generator=g).to(device)
    precond = (torch.rand(n, generator=g) + 0.5).to(device)
    seed = torch.tensor([1234], device=device) if tensor_seed else 1234
    for options in ({}, {"source": master}, {"precond": precond}):
        x_launch, x_call = master.to(dtype), master.to(dtype)
        launch = perturb_launcher(x_launch, seed, backend, offset=33, distribution="gaussian", **options)
        for scale, index in ((1e-2, 0), (-2e-2, 0), (5e-3, 2)):
            launch(scale, index)
            perturb_(x_call, seed, scale, backend, offset=33, seed_index=index, **options)
            assert_bitwise_equal(x_launch, x_call, f"{backend} {dtype} n={n} {sorted(options)} index={index}")
