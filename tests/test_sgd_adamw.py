"""Fused SGD / AdamW kernels: Triton vs torch twin (bit-identical) and vs torch.optim trajectories."""

import itertools

import pytest
import torch

from conftest import DTYPES, SIZES, assert_bitwise_equal
from subgrad.kernels import adamw_launcher, adamw_step_, sgd_step_

#: Trajectory tolerance against torch.optim after STEPS steps.  torch.optim rounds to the parameter
#: dtype after every elementary op (and may use FMA); the fused kernels round once per stored tensor.
TRAJ_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
STEPS = 5

SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True),
    dict(lr=0.02, momentum=0.8, nesterov=True, weight_decay=1e-3),
]
#: Kernel-only configurations (extensions torch.optim lacks), checked against the twin.
SGD_KERNEL_ONLY = [dict(lr=0.05, momentum=0.9, weight_decay=1e-2, l1=1e-3)]
ADAMW_KERNEL_ONLY = [dict(lr=1e-2, weight_decay=0.05, l1=1e-3, amsgrad=True)]
ADAMW_CONFIGS = [
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True),
    dict(lr=1e-3, weight_decay=0.0, maximize=True),
]


def _tensors(n, dtype, device, count, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return [torch.randn(n, generator=g).to(device=device, dtype=dtype) for _ in range(count)]


# -- kernel vs twin ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", range(len(SGD_CONFIGS) + len(SGD_KERNEL_ONLY)))
def test_sgd_triton_matches_twin(n, dtype, cfg, device):
    kw = dict((SGD_CONFIGS + SGD_KERNEL_ONLY)[cfg])
    param, grad, buf = _tensors(n, dtype, device, 3)
    for first_step in (True, False):
        out = {}
        for backend in ("triton", "torch"):
            p, b = param.clone(), buf.clone()
            sgd_step_(p, grad, b, first_step=first_step, backend=backend, **kw)
            out[backend] = (p, b)
        assert_bitwise_equal(out["triton"][0], out["torch"][0], f"param {kw} first={first_step}")
        assert_bitwise_equal(out["triton"][1], out["torch"][1], f"buffer {kw} first={first_step}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", range(len(ADAMW_CONFIGS) + len(ADAMW_KERNEL_ONLY)))
def test_adamw_triton_matches_twin(n, dtype, cfg, device):
    kw = dict((ADAMW_CONFIGS + ADAMW_KERNEL_ONLY)[cfg])
    beta1, beta2 = kw.pop("betas", (0.9, 0.999))
    param, grad, m, v, vmax = _tensors(n, dtype, device, 5)
    v, vmax = v.abs(), vmax.abs()
    out = {}
    for backend in ("triton", "torch"):
        state = [t.clone() for t in (param, m, v, vmax)]
        adamw_step_(
            state[0], grad, state[1], state[2], state[3], step=7, beta1=beta1, beta2=beta2, backend=backend, **kw
        )
        out[backend] = state
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), out["triton"], out["torch"]):
        assert_bitwise_equal(a, b, f"{name} {kw}")


# -- vs torch.optim, param groups with different hyperparameters ------------------------------------
def _run_against_torch(torch_cls, configs, fused_step, dtype, device, outlier_fraction=0.0):
    params = [torch.nn.Parameter(t) for t in _tensors(1023, dtype, device, 1) + _tensors(70001, dtype, device, 1, 1)]
    params += [torch.nn.Parameter(_tensors(1, dtype, device, 1, 2)[0])]
    ours = [p.detach().clone() for p in params]
    groups = [dict(params=[p], **cfg) for p, cfg in zip(params, configs)]
    opt = torch_cls(groups, foreach=False)
    state = [dict() for _ in ours]
    g = torch.Generator().manual_seed(42)
    for step in range(1, STEPS + 1):
        for p, mine, group, st in zip(params, ours, opt.param_groups, state):
            p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
            fused_step(mine, p.grad, group, st, step)
        opt.step()
    for i, (p, mine) in enumerate(zip(params, ours)):
        ref, mine = p.detach().float(), mine.float()
        assert bool(torch.isfinite(mine).all()), f"group {i}: fused step produced non-finite values"
        close = torch.isclose(ref, mine, **TRAJ_TOL[dtype])
        diff = (ref - mine).abs()[~close]
        assert (~close).float().mean().item() <= outlier_fraction, (
            f"group {i} ({configs[i]}): {int((~close).sum())} of {close.numel()} differ, max {diff.max().item()}"
        )


def _sgd_fused(param, grad, group, st, step):
    st.setdefault("buf", torch.zeros_like(param))
    sgd_step_(
        param,
        grad,
        st["buf"],
        lr=group["lr"],
        momentum=group["momentum"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        weight_decay=group["weight_decay"],
        maximize=group["maximize"],
        first_step=step == 1,
        backend="triton",
    )


def _adamw_fused(param, grad, group, st, step):
    for key in ("m", "v", "vmax"):
        st.setdefault(key, torch.zeros_like(param))
    beta1, beta2 = group["betas"]
    adamw_step_(
        param,
        grad,
        st["m"],
        st["v"],
        st["vmax"],
        step=step,
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=group["amsgrad"],
        maximize=group["maximize"],
        backend="triton",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("configs", list(itertools.combinations(SGD_CONFIGS, 3)), ids=lambda c: f"{len(c)}groups")
def test_sgd_matches_torch_optim(configs, dtype, device):
    _run_against_torch(torch.optim.SGD, configs, _sgd_fused, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adamw_matches_torch_optim(dtype, device):
    # torch.optim's float16 AdamW rounds eps to float16 (1e-8 becomes 0) and its (1 - beta2) g^2 underflows
    # for |g| below ~2e-3, so on those elements it divides by zero or by a coarse eps (about 0.4% here:
    # infinities in torch, finite steps in the fused float32 arithmetic).  Allow 1% such outliers.
    _run_against_torch(
        torch.optim.AdamW,
        ADAMW_CONFIGS,
        _adamw_fused,
        dtype,
        device,
        outlier_fraction=0.01 if dtype == torch.float16 else 0.0,
    )


# -- arguments --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bad_arguments(dtype):
    """The same checks on the float32 kernel path and the float64 twin path."""
    x = torch.zeros(8, dtype=dtype)
    with pytest.raises(ValueError, match="needs a momentum_buffer"):
        sgd_step_(x, x.clone(), None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov momentum requires"):
        sgd_step_(x, x.clone(), x.clone(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="grad must have as many elements"):
        sgd_step_(x, torch.zeros(7, dtype=dtype), lr=0.1)
    with pytest.raises(ValueError, match="exp_avg must have as many elements"):
        adamw_step_(x, x.clone(), torch.zeros(9, dtype=dtype), x.clone(), step=1, lr=1e-3)
    with pytest.raises(ValueError, match="amsgrad=True needs"):
        adamw_step_(x, x.clone(), x.clone(), x.clone(), step=1, lr=1e-3, amsgrad=True)
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw_step_(x, x.clone(), x.clone(), x.clone(), step=0, lr=1e-3)


# -- gradients through an address table ---------------------------------------------------------------
#: parameter shapes of one flat buffer (one spans two tiles, one is tiny), and which have a gradient
TABLE_SHAPES = [(3, 5), (7,), (2, 600), (1030,)]


def _table_case(dtype, device, covered):
    from subgrad.kernels.grad_table import GradTable

    sizes = [torch.Size(s).numel() for s in TABLE_SHAPES]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in TABLE_SHAPES]
    table = GradTable([offsets[i] for i in covered], [TABLE_SHAPES[i] for i in covered], torch.empty(sum(sizes)))
    table.set_grads([grads[i] for i in covered])
    return table, sum(sizes), [(offsets[i], offsets[i] + sizes[i]) for i in range(len(sizes)) if i not in covered]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("covered", [[0, 1, 2, 3], [0, 2, 3]], ids=["all", "one-missing"])
def test_grad_table_kernels_match_twins(dtype, covered, device):
    """SGD and AdamW (host and device scalars, with the step counts advanced in the same launch, a gate
    open and closed) reading gradients through an address table: kernel and twin agree bit for bit, and
    a parameter the table does not cover is left as it was."""
    table, n, untouched = _table_case(dtype, device, covered)
    param, buf, m, v = _tensors(n, dtype, device, 4)
    v = v.abs()
    out = {}
    for backend in ("triton", "torch"):
        p, b = param.clone(), buf.clone()
        sgd_step_(p, table, b, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
        results = [p, b]
        for gate in (None, torch.tensor(True, device=device), torch.tensor(False, device=device)):
            p, mm, vv = param.clone(), m.clone(), v.clone()
            counts = torch.tensor([3.0, 5.0, 3.0, 3.0], device=device)
            increments = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)
            launch = adamw_launcher(
                p,
                table,
                mm,
                vv,
                None,
                step=counts[:1],
                lr=torch.tensor(1e-2, device=device),
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=1e-2,
                amsgrad=False,
                maximize=False,
                l1=0.0,
                gate=gate,
                backend=backend,
                advance=(counts, increments, torch.zeros(1, dtype=torch.int32, device=device)),
            )
            launch()
            launch()  # twice: the ticket counter re-arms itself
            results += [p, mm, vv, counts]
        out[backend] = results
    for i, (a, b) in enumerate(zip(out["triton"], out["torch"])):
        assert_bitwise_equal(a, b, f"result {i}")
    p = out["torch"][0]
    for start, stop in untouched:
        assert_bitwise_equal(p[start:stop], param[start:stop], "a parameter without a gradient")
    assert out["torch"][5].tolist() == [5.0, 5.0, 5.0, 5.0], "two open steps advance the covered counts by 2"
    assert out["torch"][-1].tolist() == [3.0, 5.0, 3.0, 3.0], "a closed gate advances nothing"
