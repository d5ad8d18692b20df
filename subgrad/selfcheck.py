"""Kernel self-check: run every Triton kernel and its torch twin on the same inputs and compare.

Used by ``subgrad selfcheck`` and by
``benchmarks/gpu_check.sh``.  On a machine without CUDA the kernels run in Triton's interpreter,
which ``subgrad selfcheck`` switches on before importing them.
"""

from __future__ import annotations

import time

import torch

from .devices import pick_device


def _cases(device: torch.device, n: int):
    """(name, run(backend) -> tensors to compare) for every kernel."""
    from subgrad import kernels as K

    g = torch.Generator().manual_seed(0)

    def rand(dtype=torch.float32):
        return torch.randn(n, generator=g).to(device=device, dtype=dtype)

    x0, grad0, m0, v0 = rand(), rand(), rand(), rand().abs()
    c_blocks = torch.tensor([0.5, -1.0, 2.0], device=device)
    starts = K.make_block_starts([n // 3, n // 3, n - 2 * (n // 3)], device)

    def perturb(backend):
        x = x0.clone()
        return [K.perturb_(x, 7, 1e-3, backend=backend)]

    def zo_update(backend):
        x, buf = x0.clone(), torch.zeros_like(x0)
        K.zo_update_(
            x,
            7,
            c_blocks,
            1e-2,
            weight_decay=1e-4,
            momentum=0.9,
            momentum_buffer=buf,
            restore_scale=1e-3,
            block_starts=starts,
            backend=backend,
        )
        return [x, buf]

    def sgd(backend):
        p, buf = x0.clone(), m0.clone()
        K.sgd_step_(p, grad0, buf, lr=0.1, weight_decay=1e-4, momentum=0.9, nesterov=True, backend=backend)
        return [p, buf]

    def adamw(backend):
        p, m, v = x0.clone(), m0.clone(), v0.clone()
        K.adamw_step_(p, grad0, m, v, step=3, lr=1e-3, backend=backend)
        return [p, m, v]

    return [
        ("philox_normal", lambda b: [K.philox_normal(5, n, offset=11, device=device, backend=b)]),
        ("philox_rademacher", lambda b: [K.philox_rademacher(5, n, offset=11, device=device, backend=b)]),
        ("perturb_", perturb),
        ("zo_update_", zo_update),
        ("sgd_step_", sgd),
        ("adamw_step_", adamw),
    ]


def run_selfcheck(device: str = "auto", n: int = 70001) -> bool:
    """Print one line per kernel (bit-identical or not, time per backend); return True if all match."""
    dev = pick_device(device)
    print(
        f"subgrad self-check on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
        f"{n} elements; Triton {'compiled' if dev.type == 'cuda' else 'interpreted'}"
    )
    print(f"{'kernel':<20}{'triton vs torch twin':<24}{'triton s':>10}{'torch s':>10}")
    ok = True
    for name, run in _cases(dev, n):
        timings, outs = {}, {}
        for backend in ("triton", "torch"):
            start = time.perf_counter()
            outs[backend] = run(backend)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            timings[backend] = time.perf_counter() - start
        mismatches = sum(int((a != b).sum()) for a, b in zip(outs["triton"], outs["torch"]))
        verdict = "bit-identical" if mismatches == 0 else f"{mismatches} elements differ"
        ok &= mismatches == 0
        print(f"{name:<20}{verdict:<24}{timings['triton']:>10.3f}{timings['torch']:>10.3f}")
    print("self-check passed" if ok else "self-check FAILED: kernels and twins disagree")
    return ok
