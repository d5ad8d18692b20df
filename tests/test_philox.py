"""Philox directions: Triton kernel vs torch twin (bit-identical), known answers, the direction map, accuracy,
statistics and independence."""

import math
import os
import re

import pytest
import torch

from conftest import DEVICE, SIZES, assert_bitwise_equal
from subgrad.kernels import philox as P
from subgrad.kernels import philox_bits, philox_normal, philox_rademacher

SEEDS = [0, 1, 2**31 + 7, 2**62 - 1]


# -- random bits ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "counter, key, expected",
    [
        # Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors), counter words c0..c3, key k0, k1.
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_twin_matches_philox_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    out = P.philox4x32_torch(key[0] | (key[1] << 32), *words)
    assert tuple(int(o) for o in out) == expected


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_bits_identical(n, seed, device):
    offset = 3 if n > 1 else 2**32 - 1  # also the last counter a seed can index
    assert_bitwise_equal(
        philox_bits(seed, n, offset, device, backend="triton"),
        philox_bits(seed, n, offset, device, backend="torch"),
        f"bits seed={seed} n={n}",
    )


# -- directions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("make", [philox_normal, philox_rademacher], ids=["normal", "rademacher"])
def test_direction_identical_across_backends(make, n, seed, device):
    for offset in (0, 12345):
        assert_bitwise_equal(
            make(seed, n, offset, device, backend="triton"),
            make(seed, n, offset, device, backend="torch"),
            f"{make.__name__} offset={offset}",
        )


def test_offset_selects_a_slice(device):
    full = philox_normal(9, 3000, device=device, backend="torch")
    assert_bitwise_equal(philox_normal(9, 1000, offset=1500, device=device, backend="triton"), full[1500:2500])


def test_rademacher_map_uses_every_bit(device):
    """Element 4096 G + 128 b + 4 l + k is -1 exactly when bit b of word k of Philox call 32 G + l is set
    (derived here element by element from the raw words, not from the twin's reshapes)."""
    groups = 2
    n = 4096 * groups
    words = philox_bits(4, 32 * groups, device=device, backend="torch").to(torch.int64) & 0xFFFFFFFF  # [call, k]
    e = torch.arange(n, device=device)
    call, b, k = 32 * (e // 4096) + (e % 128) // 4, (e % 4096) // 128, e % 4
    expected = torch.where((words[call, k] >> b) & 1 == 1, -1.0, 1.0)
    for backend in ("triton", "torch"):
        assert_bitwise_equal(philox_rademacher(4, n, device=device, backend=backend), expected, backend)
        # an offset inside a group (a block slice of a flat buffer) reads the same map
        assert_bitwise_equal(
            philox_rademacher(4, 5000, offset=3000, device=device, backend=backend),
            expected[3000:8000],
            f"{backend}, offset 3000",
        )


def _exact_box_muller(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal pair of each Philox word (philox.py's map) evaluated in float64 from the same draws."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    r = torch.sqrt(-2.0 * torch.log((((w >> 15) & 0xFFFE) | 1).double() * 2.0**-16))
    y = (2 * (((w & 0x7FFF) ^ 0x4000) - 0x4000) + 1).double() * 2.0**-15  # bits 0..14 as a signed integer
    theta = math.pi / 4 * (1 + y)
    sign0 = 1 - 2 * ((w >> 31) & 1).double()
    sign1 = 1 - 2 * ((w >> 15) & 1).double()
    return sign0 * r * torch.cos(theta), sign1 * r * torch.sin(theta)


def test_normal_map_is_the_documented_one():
    """Element 1024 G + 512 h + 4 g + 2 i + s is output s of word 2 h + i of call 128 G + g."""
    n = 3 * 1024
    words = P.philox4x32_torch(12, torch.arange(3 * 128, dtype=torch.int64))
    e = torch.arange(n)
    call, h, i, s = 128 * (e // 1024) + (e % 512) // 4, (e % 1024) // 512, (e % 4) // 2, e % 2
    word = torch.stack(words, dim=1)[call, 2 * h + i]
    z0, z1 = _exact_box_muller(word)
    expected = torch.where(s == 0, z0, z1)
    z = philox_normal(12, n, backend="torch").double()
    assert (z - expected).abs().max().item() < 1.2e-6


def test_normal_accuracy_bound():
    """Stated bound: |z - exact| <= 1.2e-6 against float64 Box-Muller of the same draws, over every radius
    draw (with the extreme angles), every angle draw, and 2**20 random words."""
    radius = torch.arange(1 << 15, dtype=torch.int64)[:, None] << 16
    angle = torch.arange(1 << 16, dtype=torch.int64)[:, None]
    words = torch.cat(
        [
            (radius | torch.tensor([0, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xBFFF])).reshape(-1),
            (angle | (torch.tensor([0, 1, 2**14, 2**15 - 1]) << 16)).reshape(-1),
            torch.randint(0, 2**32, (1 << 20,), generator=torch.Generator().manual_seed(0)),
        ]
    )
    for got, exact in zip(P.normal_pair_torch(words.to(torch.int32)), _exact_box_muller(words)):
        err = (got.double() - exact).abs()
        worst = int(torch.argmax(err))
        assert err[worst].item() <= 1.2e-6, f"word {hex(words[worst])}: z={got[worst]} exact={exact[worst]}"
    largest = torch.cat(P.normal_pair_torch(words.to(torch.int32))).abs().max().item()
    assert largest <= math.sqrt(32 * math.log(2)) + 1.2e-6, largest


#: positions within a Rademacher group (4096 G + 128 b + 4 l + k) that share call l = 3 (bits b of words k),
#: and two that sit next to them but come from the neighbouring calls l = 2 and l = 4
RADEMACHER_POSITIONS = [128 * b + 4 * 3 + k for b, k in ((0, 0), (0, 1), (0, 3), (1, 0), (2, 2), (31, 3))] + [11, 16]


#: the eight positions within a normal group fed by call g = 5 (4 g + j and 512 + 4 g + j), and two neighbours
NORMAL_POSITIONS = [20, 21, 22, 23, 532, 533, 534, 535, 19, 24]


@pytest.mark.parametrize(
    "make, group", [(philox_normal, 1024), (philox_rademacher, 4096)], ids=["normal", "rademacher"]
)
def test_outputs_of_one_philox_call_are_uncorrelated(make, group):
    """Neighbouring elements share a Philox call: every pair of positions within a call (and the squares
    of normals, which would expose a shared Box-Muller radius or angle) is uncorrelated."""
    groups = 1 << 12
    z = make(5, groups * group, backend="torch").double().view(groups, group)
    positions = NORMAL_POSITIONS if make is philox_normal else RADEMACHER_POSITIONS
    for i in positions:
        for j in positions:
            if i < j:
                for f, what in ((lambda t: t, "z"), (lambda t: t * t, "z^2"))[: 2 if make is philox_normal else 1]:
                    corr = torch.corrcoef(torch.stack([f(z[:, i]), f(z[:, j])]))[0, 1].item()
                    assert abs(corr) < 5 / math.sqrt(groups), f"positions {i}, {j} of a group: corr({what}) = {corr}"


# -- statistics (bounds a wrong transform fails: e.g. a missing factor 2 gives variance 0.5) ----------
def test_normal_moments_and_cdf():
    n = 1 << 20
    z = philox_normal(11, n, backend="torch").double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2.0 / n)
    kurtosis = ((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2
    assert abs(kurtosis - 3.0) < 5 * math.sqrt(24.0 / n)
    # Kolmogorov-Smirnov against the normal CDF (critical value at alpha = 1e-4 is about 2.0 / sqrt(n)).
    s, _ = torch.sort(z)
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((grid - cdf).abs(), (cdf - (grid - 1 / n)).abs()).max().item()
    assert ks < 2.0 / math.sqrt(n), f"KS statistic {ks}"


@pytest.mark.parametrize("make", [philox_normal, philox_rademacher], ids=["normal", "rademacher"])
def test_seeds_and_neighbours_independent(make):
    """Directions seed and seed + 1 (a step's q directions, or consecutive steps) are independent."""
    n = 1 << 18
    a, b = make(1, n, backend="torch").double(), make(2, n, backend="torch").double()
    pairs = [(a, b, "seed 1 vs seed 2"), (a[:-1], a[1:], "neighbouring elements")]
    if make is philox_normal:  # squares are 1 for Rademacher directions
        pairs.append((a * a, b * b, "squares, seed 1 vs seed 2"))
    for x, y, what in pairs:
        corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), f"{what}: correlation {corr}"
    assert abs(a.mean().item()) < 5 / math.sqrt(n)


# -- arguments --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1, n=4), "seed must be in"),
        (dict(seed=2**62, n=4), "seed must be in"),
        (dict(seed=1, n=4, offset=2**32 - 3), "exceeds the 2\\*\\*32"),
        (dict(seed=1, n=-1), "n must be >= 0"),
        (dict(seed=1, n=4, backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        philox_normal(**kwargs)


def test_environment_selects_backend(monkeypatch, device):
    from subgrad.kernels import resolve_backend

    x = torch.zeros(1, device=device)
    assert resolve_backend(None, x) == ("triton" if x.is_cuda else "torch")
    monkeypatch.setenv("SUBGRAD_BACKEND", "triton")
    assert resolve_backend(None, x) == "triton"
    assert resolve_backend("torch", x) == "torch"  # an explicit argument wins
    monkeypatch.setenv("SUBGRAD_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(None, x)


def test_zero_length(device):
    assert philox_normal(1, 0, device=device, backend="triton").numel() == 0


# -- the compiled CPU twin ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed, offset, n", [(3, 0, 1 << 15), (2**61 + 5, 777, 100_000), (9, 4096 * 1024 + 5, 70001)])
def test_compiled_twin_matches_eager_twin(seed, offset, n, monkeypatch):
    """On CPU, runs of >= COMPILED_MIN_CALLS calls go through torch.compile: bit for bit the eager twin
    (which the Triton tests above pin to the kernel)."""
    if P._compiled_normal_pairs() is None:
        assert not os.environ.get("CI"), "CI must exercise the compiled twin (torch.compile failed there)"
        pytest.skip("torch.compile is unavailable on this machine; the eager twin runs instead")
    assert -(-(offset % 1024 + n) // 1024) * 128 >= P.COMPILED_MIN_CALLS  # the compiled path is taken
    compiled = P.direction_torch(seed, offset, n, "cpu", False)
    monkeypatch.setitem(P._COMPILED, "fn", None)
    assert_bitwise_equal(compiled, P.direction_torch(seed, offset, n, "cpu", False), "compiled vs eager twin")


def _compile_wrongly(fn, **kwargs):
    return lambda counters, keys: tuple(t + 1 for t in fn(counters, keys))


def _compile_without_compiler(fn, **kwargs):
    raise RuntimeError("no C++ compiler found")


@pytest.mark.parametrize(
    "compile_, env, message",
    [
        (_compile_wrongly, "1", "differs from the eager twin"),
        (_compile_without_compiler, "1", "failed \\(RuntimeError: no C\\+\\+ compiler found\\)"),
        (_compile_wrongly, "0", None),  # switched off: not even tried
    ],
    ids=["differs", "no-compiler", "switched-off"],
)
def test_compiled_twin_falls_back_to_the_eager_twin(compile_, env, message, monkeypatch, recwarn):
    monkeypatch.setattr(P, "_COMPILED", {})
    monkeypatch.setattr(P.torch, "compile", compile_)
    monkeypatch.setenv("SUBGRAD_COMPILE_TWIN", env)
    assert P._compiled_normal_pairs() is None
    warned = [str(w.message) for w in recwarn if "subgrad" in str(w.message)]
    if message is None:
        assert not warned
    else:
        assert len(warned) == 1 and re.search(message, warned[0]), warned
    # the eager twin runs, and gives the kernel's bits
    assert_bitwise_equal(
        P.direction_torch(4, 0, 1 << 15, "cpu", False),
        philox_normal(4, 1 << 15, device=DEVICE, backend="triton").cpu(),
        "fallback twin vs kernel",
    )
