"""subgrad.optim.SGD / AdamW driven by PyTorch's own optimizer test data, on CPU.

The configurations are the ``OptimizerInfo`` entries for ``torch.optim.SGD`` and ``torch.optim.AdamW``
that ship in the torch wheel (``torch.testing._internal.common_optimizers.optim_db``): every kwargs set
their ``optim_inputs_func`` generates, and every error case of ``optim_error_inputs_func``.  Only that
public data is read; the checks are this file's own:

* trajectories: 5 steps of a small MLP, subgrad vs torch.optim, per dtype (tolerances below);
* ``state_dict`` both ways: 3 steps, the state moved into the other library's optimizer, 2 more steps;
* error inputs: the exception type and message torch raises (its ``error_regex``), or torch's warning.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

common = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="torch's OptimizerInfo data needs torch.testing._internal (and expecttest)",
)
from subgrad.optim import SGD, AdamW  # noqa: E402

OURS = {torch.optim.SGD: SGD, torch.optim.AdamW: AdamW}
INFOS = {info.optim_cls: info for info in common.optim_db if info.optim_cls in OURS}
#: elementwise |ours - torch| <= rtol |torch| + atol after 5 steps.  float32 / float64: the issue's
#: relative bounds (atol covers weights that pass through zero); half types: one rounding of the fused
#: float32 arithmetic vs torch's rounding after every elementary op.
TOL = {
    torch.float32: (1e-6, 1e-7),
    torch.float64: (1e-12, 1e-14),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
STEPS = 5


def _configs():
    out = []
    for theirs, info in INFOS.items():
        for dtype in TOL:
            for i, inp in enumerate(info.optim_inputs_func(device="cpu", dtype=dtype)):
                out.append(pytest.param(theirs, dtype, i, id=f"{theirs.__name__}-{inp.desc}-{str(dtype)[6:]}"))
    return out


def _kwargs(theirs, dtype, i) -> dict:
    """The i-th configuration, with tensors cloned (each optimizer gets its own tensor lr)."""
    inp = list(INFOS[theirs].optim_inputs_func(device="cpu", dtype=dtype))[i]
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inp.kwargs.items()}


def _net(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).to(dtype)


def _steps(model, opt, start, count):
    for i in range(start, start + count):
        g = torch.Generator().manual_seed(i)
        x, y = (
            torch.randn(12, 6, generator=g).to(next(model.parameters()).dtype),
            torch.randint(0, 3, (12,), generator=g),
        )
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()


def _compare(ours_model, torch_model, dtype, what):
    rtol, atol = TOL[dtype]
    for (name, a), b in zip(ours_model.named_parameters(), torch_model.parameters()):
        a, b = a.detach().double(), b.detach().double()
        bad = (a - b).abs() > rtol * b.abs() + atol
        assert not bad.any(), (
            f"{what}: {name}: {int(bad.sum())} of {a.numel()} elements differ beyond rtol {rtol} "
            f"atol {atol}; worst |diff| {(a - b).abs().max().item():.3g} "
            f"(ours {a[bad][0].item():.9g} vs torch {b[bad][0].item():.9g})"
        )


def _adapt(theirs, dtype, kwargs):
    if theirs is torch.optim.AdamW and dtype == torch.float16:
        # torch.optim.AdamW computes eps + sqrt(v) in float16, where eps=1e-8 is 0: it divides by zero
        kwargs.setdefault("eps", 1e-4)
    return kwargs


@pytest.mark.parametrize("theirs, dtype, i", _configs())
def test_trajectory_matches_torch(theirs, dtype, i):
    ours_model, torch_model = _net(dtype), _net(dtype)
    ours = OURS[theirs](ours_model.parameters(), **_adapt(theirs, dtype, _kwargs(theirs, dtype, i)))
    ref = theirs(torch_model.parameters(), **_adapt(theirs, dtype, _kwargs(theirs, dtype, i)))
    _steps(ours_model, ours, 0, STEPS)
    _steps(torch_model, ref, 0, STEPS)
    _compare(ours_model, torch_model, dtype, "trajectory")


@pytest.mark.parametrize("theirs, dtype, i", [p for p in _configs() if p.values[1] in (torch.float32, torch.float64)])
def test_state_dict_moves_both_ways(theirs, dtype, i):
    for first_is_ours in (True, False):
        a_model, b_model = _net(dtype), _net(dtype)
        first_cls, second_cls = (OURS[theirs], theirs) if first_is_ours else (theirs, OURS[theirs])
        first = first_cls(a_model.parameters(), **_kwargs(theirs, dtype, i))
        _steps(a_model, first, 0, 3)
        b_model.load_state_dict(a_model.state_dict())
        second = second_cls(b_model.parameters(), **_kwargs(theirs, dtype, i))
        second.load_state_dict(copy.deepcopy(first.state_dict()))
        _steps(a_model, first, 3, 2)
        _steps(b_model, second, 3, 2)
        _compare(
            a_model if first_is_ours else b_model,
            b_model if first_is_ours else a_model,
            dtype,
            f"state_dict {'subgrad -> torch' if first_is_ours else 'torch -> subgrad'}",
        )


def _error_cases():
    out = []
    for theirs, info in INFOS.items():
        for j, err in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            out.append(pytest.param(theirs, j, id=f"{theirs.__name__}-{err.optimizer_error_input.desc}"))
    return out


@pytest.mark.parametrize("theirs, j", _error_cases())
def test_error_inputs_raise_what_torch_raises(theirs, j):
    err = list(INFOS[theirs].optim_error_inputs_func(device="cpu", dtype=torch.float32))[j]
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else _net(torch.float32).parameters()

    def build_and_step():
        opt = OURS[theirs](params, **inp.kwargs)
        if err.error_on == common.OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=err.error_regex):
            build_and_step()
    else:
        with pytest.raises(err.error_type, match=err.error_regex):
            build_and_step()
