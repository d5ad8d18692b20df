"""zo_update_: Triton vs torch twin (bit-identical) and against a float64 reference of the update."""

import pytest
import torch

from conftest import DTYPES, SIZES, assert_bitwise_equal
from subgrad.kernels import make_block_starts, philox_normal, philox_rademacher, zo_estimate_, zo_update_

REL_TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _blocks(n: int) -> list[int]:
    """Odd block sizes that tile n, including size-1 blocks (at most 37 of them)."""
    if n < 3:
        return [n]
    sizes, left, k = [], n, 1
    while left > 0 and len(sizes) < 36:
        s = min(left, k * k + 1)
        sizes.append(s)
        left -= s
        k += 1
    if left:
        sizes.append(left)
    return sizes


CASES = {
    "scalar": dict(c=0.75),
    "tensor1": dict(c="tensor1", weight_decay=0.01),
    "blocks": dict(c="blocks", l1=1e-3),
    "momentum": dict(c="blocks", momentum=0.9, weight_decay=1e-4),
    "master": dict(c=0.5, master=True, momentum=0.5),
    "rademacher": dict(c="blocks", distribution="rademacher", restore_scale=0.0),
    "hessian": dict(c="blocks", hessian=True, momentum=0.9),
}


def _run(case, n, dtype, device, backend):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    kw = dict(CASES[case])
    kw.setdefault("restore_scale", 1e-3)
    sizes = _blocks(n)
    if kw["c"] == "tensor1":
        kw["c"] = torch.tensor([0.75], device=device)
    elif kw["c"] == "blocks":
        kw["c"] = torch.randn(len(sizes), generator=g).to(device)
        kw["block_starts"] = make_block_starts(sizes, device)
    if kw.get("momentum"):
        kw["momentum_buffer"] = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    if kw.get("master"):
        kw["master"] = x.float() + 1e-4
    if kw.get("hessian"):
        kw["hessian"] = torch.rand(n, generator=g).to(device) + 0.5
        kw["curvature"] = torch.rand(kw["c"].numel(), generator=g).to(device)
        kw["hessian_smoothing"] = 0.1
    zo_update_(x, 1234, lr=0.05, offset=7, backend=backend, **kw)
    return x, kw


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_twin(case, n, dtype, device):
    (xt, kwt), (xr, kwr) = (_run(case, n, dtype, device, b) for b in ("triton", "torch"))
    assert_bitwise_equal(xt, xr, f"weights, case {case}")
    for key in ("momentum_buffer", "master", "hessian"):
        if isinstance(kwt.get(key), torch.Tensor):
            assert_bitwise_equal(kwt[key], kwr[key], f"{key}, case {case}")


@pytest.mark.parametrize("n", [1, 1025, pytest.param(70001, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", [c for c in CASES if c != "hessian"])
def test_matches_float64_reference(case, n, device):
    dtype = torch.float32
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(device)
    x, kw = _run(case, n, dtype, device, "triton")
    make = philox_rademacher if kw.get("distribution") == "rademacher" else philox_normal
    z = make(1234, n, 7, device, backend="torch").double()
    w = kw["master"].double() if isinstance(kw.get("master"), torch.Tensor) else None
    if w is None:
        w = x0.double() + kw["restore_scale"] * z
    else:  # the master was updated in place; rebuild its starting value
        w = x0.double() + 1e-4
    c = kw["c"]
    if isinstance(c, torch.Tensor) and c.numel() > 1:
        sizes = _blocks(n)
        c = torch.repeat_interleave(c.double(), torch.tensor(sizes, device=device))
    elif isinstance(c, torch.Tensor):
        c = c.double()
    g = c * z + kw.get("weight_decay", 0.0) * w + kw.get("l1", 0.0) * torch.sign(w)
    if kw.get("momentum"):
        g_start = kw["momentum_buffer"].double()  # already updated: it holds m = momentum * m0 + g
        assert torch.allclose(g_start, kw["momentum"] * _momentum0(case, n, device) + g, rtol=1e-5, atol=1e-6)
        g = g_start
    expected = w - 0.05 * g
    err = (x.double() - expected).abs()
    scale = w.abs() + 0.05 * g.abs() + 1e-6
    assert bool((err <= REL_TOL[dtype] * scale).all()), f"case {case}: max rel err {(err / scale).max().item()}"


def _momentum0(case, n, device):
    g = torch.Generator().manual_seed(n)
    torch.randn(n, generator=g)  # x
    if CASES[case]["c"] == "blocks":
        torch.randn(len(_blocks(n)), generator=g)
    return torch.randn(n, generator=g).to(device).double()


def test_per_block_scalars_apply_to_their_block_only(device):
    n, sizes = 1025, [1, 1000, 24]
    x = torch.zeros(n, device=device)
    c = torch.tensor([1.0, 0.0, -1.0], device=device)
    zo_update_(x, 3, c, 1.0, block_starts=make_block_starts(sizes, device), backend="triton")
    z = philox_normal(3, n, device=device)
    assert_bitwise_equal(x[:1], -z[:1])
    assert bool((x[1:1001] == 0).all())
    assert_bitwise_equal(x[1001:], z[1001:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(c=torch.ones(3)), "one value per direction"),
        (dict(c=0.1, num_directions=2), "scalar c means one direction"),
        (dict(c=torch.ones(2), num_directions=0), "num_directions must be an int >= 1"),
        (dict(c=0.1, lr=-1.0), "lr must be a finite number >= 0"),
        (dict(c=0.1, momentum=0.9), "needs a momentum_buffer"),
        (dict(c=torch.ones(2), block_starts=torch.tensor([0, 4, 8])), "num_directions x blocks"),
        (dict(c=0.1, distribution="uniform"), "distribution must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs.setdefault("lr", 0.1)
    with pytest.raises(ValueError, match=message):
        zo_update_(torch.zeros(16), 1, **kwargs)


@pytest.mark.parametrize("n", [1, 1025, pytest.param(70001, marks=pytest.mark.slow)])
@pytest.mark.parametrize("blocked", [False, True])
def test_several_directions_in_one_pass(n, blocked, device):
    """q directions (seeds s, s+1, ...) in one launch equal the sum of their contributions."""
    q, gen = 3, torch.Generator().manual_seed(5)
    x0 = torch.randn(n, generator=gen).to(device)
    sizes = _blocks(n) if blocked else [n]
    c = torch.randn(q * len(sizes), generator=gen).to(device)
    kw = dict(num_directions=q, restore_scale=1e-3, weight_decay=1e-3)
    if blocked:
        kw["block_starts"] = make_block_starts(sizes, device)
    out = {b: zo_update_(x0.clone(), 40, c, 0.1, backend=b, **kw) for b in ("triton", "torch")}
    assert_bitwise_equal(out["triton"], out["torch"], f"q={q} blocked={blocked}")
    w = x0.double() + 1e-3 * philox_normal(40 + q - 1, n, device=device).double()  # restore uses the last
    g = 1e-3 * w
    for k in range(q):
        c_k = torch.repeat_interleave(
            c[k * len(sizes) : (k + 1) * len(sizes)].double(), torch.tensor(sizes, device=device)
        )
        g = g + c_k * philox_normal(40 + k, n, device=device).double()
    expected = w - 0.1 * g
    assert torch.allclose(out["triton"].double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_zo_estimate_materialises_the_sum(n, distribution, device):
    """zo_estimate_ writes sum_k c[k, b] z_k: kernel = twin bit for bit, and equal to the float64 sum
    within float32 accumulation (3 terms: 4 float32 roundings of values |c z| <= 10)."""
    q, gen = 3, torch.Generator().manual_seed(n)
    sizes = _blocks(n)
    c = torch.randn(q * len(sizes), generator=gen).to(device)
    kw = dict(num_directions=q, block_starts=make_block_starts(sizes, device), offset=5, distribution=distribution)
    out = {b: zo_estimate_(torch.full((n,), 7.0, device=device), 9, c, backend=b, **kw) for b in ("triton", "torch")}
    assert_bitwise_equal(out["triton"], out["torch"], f"n={n} {distribution}")
    make = philox_rademacher if distribution == "rademacher" else philox_normal
    per_element = [
        torch.repeat_interleave(c[k * len(sizes) : (k + 1) * len(sizes)].double(), torch.tensor(sizes, device=device))
        for k in range(q)
    ]
    expected = sum(per_element[k] * make(9 + k, n, offset=5, device=device).double() for k in range(q))
    worst = (out["torch"].double() - expected).abs().max().item()
    assert worst <= 4 * 2**-24 * 10 * q, f"max |estimate - float64 sum| = {worst}"
    with pytest.raises(ValueError, match="float32"):
        zo_estimate_(torch.zeros(n, dtype=torch.bfloat16, device=device), 9, c, **kw)


def test_hessian_preconditioning_reference(device):
    """HiZOO path against float64: step along z / sqrt(h), h <- max(h ((1-a) + a kappa z^2), floor)."""
    n, gen = 1025, torch.Generator().manual_seed(9)
    x0 = torch.randn(n, generator=gen).to(device)
    h0 = torch.rand(n, generator=gen).to(device) + 0.5
    h = h0.clone()
    c, kappa = torch.tensor([0.7, -0.2], device=device), torch.tensor([2.0, 0.5], device=device)
    x = zo_update_(
        x0.clone(),
        8,
        c,
        0.1,
        num_directions=2,
        hessian=h,
        curvature=kappa,
        hessian_smoothing=0.25,
        restore_scale=1e-3,
        backend="triton",
    )
    z = [philox_normal(8 + k, n, device=device).double() for k in range(2)]
    s = 1 / h0.double().sqrt()
    expected = x0.double() + 1e-3 * z[1] * s - 0.1 * s * (0.7 * z[0] - 0.2 * z[1])
    assert torch.allclose(x.double(), expected, rtol=1e-6, atol=1e-6)
    expected_h = torch.clamp_min(h0.double() * (0.75 + 0.25 * (2.0 * z[0] ** 2 + 0.5 * z[1] ** 2)), 1e-4)
    assert torch.allclose(h.double(), expected_h, rtol=1e-6)


def test_block_sizes_validated():
    with pytest.raises(ValueError, match="positive ints"):
        make_block_starts([4, 0, 3])


@pytest.mark.parametrize("case", ["momentum", "rademacher", "hessian"])
def test_wide_indices_give_the_same_bits(case, device, monkeypatch):
    """The int64-index path (WIDE, for buffers of 2**31 elements or more), forced on a small buffer."""
    import subgrad.kernels.zo_update as module

    real = module.tile_launch
    monkeypatch.setattr(module, "tile_launch", lambda *args: real(*args)._replace(wide=True))
    (xt, kwt), (xr, kwr) = (_run(case, 3000, torch.float32, device, b) for b in ("triton", "torch"))
    assert_bitwise_equal(xt, xr, f"WIDE zo_update_, case {case}")
