"""perturb_activity / activity_gradient (kernels/activity.py): Triton vs torch twin (bit-identical) and
against their definitions from materialised directions (exact: every product is with a sign or a 0/1 mask;
the gradient's sum over directions is compared with the same order of float32 additions)."""

import pytest
import torch

from conftest import SIZE_VALUES, assert_bitwise_equal
from subgrad.kernels import philox_rademacher
from subgrad.kernels.activity import activity_gradient, direction_stride, perturb_activity


def _site(total: int, n: int, device, masked: bool):
    """An activity of ``total`` elements as [n, total // n] (n divides total), and its mask."""
    g = torch.Generator().manual_seed(total)
    z = torch.randn(n, total // n, generator=g).to(device)
    active = (torch.rand(n, total // n, generator=g) < 0.6).to(device) if masked else None
    return z, active


def _direction(seed: int, index: int, k: int, total: int, device) -> torch.Tensor:
    return philox_rademacher(seed, total, k * direction_stride(total), device, backend="torch", seed_index=index)


@pytest.mark.parametrize(
    "total, n", [(1, 1), (1023, 3), (1025, 5), pytest.param(70001, 1, marks=pytest.mark.slow)], ids=str
)  # SIZES as [n, m]
@pytest.mark.parametrize("masked", [False, True])
def test_perturb_activity_matches_twin_and_definition(total, n, masked, device):
    assert total in SIZE_VALUES
    z, active = _site(total, n, device, masked)
    rows = slice(n // 2, n)  # a rank's share: an offset into the direction
    m = total // n
    for k in (0, 2):
        out = {b: perturb_activity(z, active, 41, k, rows, 0.01, backend=b, seed_index=3) for b in ("triton", "torch")}
        assert_bitwise_equal(out["triton"], out["torch"], f"perturb_activity total={total} k={k}")
        u = _direction(41, 3, k, total, device).view(n, m)
        if active is not None:
            u = u * active
        expected = z[rows] + torch.tensor(0.01, dtype=torch.float32).item() * u[rows]
        assert torch.equal(out["torch"], expected), (out["torch"] - expected).abs().max()


@pytest.mark.parametrize("total, n", [(1, 1), (1023, 3), (1025, 5), (70001, 1)], ids=str)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("with_parts", [False, True])
def test_activity_gradient_matches_twin_and_definition(total, n, q, with_parts, device):
    z, active = _site(total, n, device, masked=True)
    m = total // n
    n_parts = 5 if with_parts else 1
    parts = (torch.arange(m, device=device) * 7) % n_parts if with_parts else None
    d = torch.randn(q, n_parts, n, generator=torch.Generator().manual_seed(q)).to(device)
    out = {b: activity_gradient(d, active, parts, 8, z.shape, backend=b, seed_index=2) for b in ("triton", "torch")}
    assert_bitwise_equal(out["triton"], out["torch"], f"activity_gradient total={total} q={q}")
    acc = None
    for k in range(q):
        per_unit = d[k].T[:, parts] if parts is not None else d[k, 0][:, None]
        term = per_unit * _direction(8, 2, k, total, device).view(n, m)
        acc = term if acc is None else acc + term
    expected = acc * (1.0 / (q * n)) * active
    assert torch.allclose(out["torch"], expected, rtol=1e-6, atol=0), (out["torch"] - expected).abs().max()


def test_a_device_seed_reads_the_same_directions(device):
    z, active = _site(1023, 3, device, masked=True)
    seed = torch.tensor([8], dtype=torch.int64, device=device)
    d = torch.randn(2, 1, 3, device=device)
    for b in ("triton", "torch"):
        assert torch.equal(
            perturb_activity(z, active, seed, 1, slice(0, 3), 0.5, backend=b, seed_index=1),
            perturb_activity(z, active, 8, 1, slice(0, 3), 0.5, backend=b, seed_index=1),
        )
        assert torch.equal(
            activity_gradient(d, active, None, seed, z.shape, backend=b, seed_index=1),
            activity_gradient(d, active, None, 8, z.shape, backend=b, seed_index=1),
        )


def test_bad_arguments_are_refused():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="active must be torch.bool with 6 elements"):
        perturb_activity(z, torch.zeros(2, 3), 0, 0, slice(0, 2), 0.1)
    with pytest.raises(ValueError, match="rows must be a slice with step 1"):
        perturb_activity(z, None, 0, 0, slice(0, 2, 2), 0.1)
    with pytest.raises(ValueError, match="one part when parts is None"):
        activity_gradient(torch.zeros(1, 2, 2), None, None, 0, z.shape)
    with pytest.raises(ValueError, match="parts must be torch.int64 with 3 elements"):
        activity_gradient(torch.zeros(1, 2, 2), None, torch.zeros(4, dtype=torch.int64), 0, z.shape)
