"""Kernel benchmark: each subgrad kernel against the baseline users have today, measured in one run.

    python benchmarks/kernels.py                 # sizes 1e4..1e8 on CUDA, 1e4..1e6 on CPU
    python benchmarks/kernels.py --sizes 1e4 1e6 --out benchmarks/results/

On CUDA the Triton kernels run; on CPU the torch twins do (Triton's interpreter is not a runtime).
Baselines, timed in the same process:
  perturb   per-tensor ``torch.normal`` + ``add_`` over the model's tensors, reseeding with
            ``torch.manual_seed`` each pass, as public zeroth-order trainers (MeZO) do; and one flat
            ``x.add_(torch.randn(n), alpha=eps)`` (the CPU yardstick), gaussian and rademacher
  zo_update the same trainers' restore (regenerate z, add eps z) + ``p -= lr (c z + wd p)`` per tensor
  sgd       ``torch.optim.SGD(momentum=0.9)`` fused where available, else foreach
  adamw     ``torch.optim.AdamW`` fused where available, else foreach
The N elements are split into 64 tensors (ResNet-like size spread) for the baselines; subgrad works
on the flat buffer (one launch).  ``copy`` is a device-to-device ``copy_`` of N float32 (8 bytes per
element moved) and gives the bandwidth ceiling.  Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

from bench_common import add_device_argument, file_label, machine_name, pick_device, write_result
from subgrad import __version__
from subgrad import kernels as K

# Bytes each op must move per fp32 element (reads + writes of the tensors it touches).
BYTES_PER_ELEMENT = {"copy": 8, "perturb": 8, "perturb_rademacher": 8, "zo_update": 8, "sgd": 20, "adamw": 28}
EPS, LR, WD = 1e-3, 1e-3, 1e-4


def split_sizes(n: int, parts: int = 64) -> list[int]:
    """n elements as `parts` tensors whose sizes spread over ~3 decades, like a CNN's layers."""
    weights = [math.exp(i * 7.0 / parts) for i in range(parts)]
    sizes = [max(1, int(n * w / sum(weights))) for w in weights]
    sizes[-1] += n - sum(sizes)
    return [s for s in sizes if s > 0]


def timer(device: torch.device, repeats: int):
    """Median seconds per call of fn(), after as many warm-up calls (on CPU the first tens of calls of a
    fresh process page in heap memory: the perturb_ twin at 1e5 elements took 2.0 ms with ~360 page
    faults per call for about 15 calls, then 1.0 ms with none)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def cpu_time(fn):
        for _ in range(repeats):  # warm-up: the first calls of a process page in the allocator's heap
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return cpu_time


def paired_timer(device: torch.device, repeats: int):
    """(median seconds of a(), median seconds of b()).  On CPU the calls alternate, so a slow spell of
    this shared VM hits both sides of a ratio alike (timed in separate blocks, the same ratio moved by
    up to 1.5x between runs); on CUDA two do_bench runs."""
    single = timer(device, repeats)
    if device.type == "cuda":
        return lambda a, b: (single(a), single(b))

    def paired(a, b):
        for _ in range(repeats):  # warm-up, as in timer()
            a(), b()
        samples = ([], [])
        for _ in range(repeats):
            for fn, times in zip((a, b), samples):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(samples[0]), statistics.median(samples[1])

    return paired


def torch_optim_kwargs(cls, device):
    """fused=True where this torch supports it on this device, else foreach."""
    try:
        cls([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
        return {"fused": True}, "fused"
    except (RuntimeError, ValueError, TypeError):
        return {"foreach": True}, "foreach"


def bench_size(n: int, device: torch.device, measure, measure_pair) -> list[dict]:
    flat = torch.randn(n, device=device)
    tensors = list(torch.split(torch.randn(n, device=device), split_sizes(n)))
    tensors = [t.clone() for t in tensors]
    rows = []

    def row(op, ours, baseline, baseline_name):
        rows.append(
            dict(
                op=op,
                n=n,
                seconds=ours,
                baseline=baseline_name,
                baseline_seconds=baseline,
                bytes_per_element=BYTES_PER_ELEMENT[op],
            )
        )

    dst = torch.empty_like(flat)
    row("copy", measure(lambda: dst.copy_(flat)), None, None)

    def mezo_perturb():
        torch.manual_seed(1)
        for t in tensors:
            z = torch.normal(mean=0, std=1, size=t.size(), device=t.device, dtype=t.dtype)
            t.add_(z, alpha=EPS)

    row("perturb", measure(lambda: K.perturb_(flat, 1, EPS)), measure(mezo_perturb), "per-tensor torch.normal + add_")

    # the CPU yardstick: one flat x.add_(torch.randn(n), alpha=eps), both distributions against it,
    # each timed interleaved with its own baseline calls
    def randn_add():
        flat.add_(torch.randn(n, device=device), alpha=EPS)

    row("perturb", *measure_pair(lambda: K.perturb_(flat, 1, EPS), randn_add), "x.add_(torch.randn(n), alpha=eps)")
    ours, baseline = measure_pair(lambda: K.perturb_(flat, 1, EPS, distribution="rademacher"), randn_add)
    row("perturb_rademacher", ours, baseline, "x.add_(torch.randn(n), alpha=eps)")

    def mezo_update():
        torch.manual_seed(1)
        for t in tensors:
            z = torch.normal(mean=0, std=1, size=t.size(), device=t.device, dtype=t.dtype)
            t.add_(z, alpha=EPS)  # restore
            t.sub_(LR * (0.5 * z + WD * t))

    row(
        "zo_update",
        measure(lambda: K.zo_update_(flat, 1, 0.5, LR, weight_decay=WD, restore_scale=EPS)),
        measure(mezo_update),
        "per-tensor regenerate z + restore + update",
    )

    grads = [torch.randn_like(t) for t in tensors]
    params = [torch.nn.Parameter(t) for t in tensors]
    for p, g in zip(params, grads):
        p.grad = g
    flat_grad, flat_buf = torch.randn_like(flat), torch.zeros_like(flat)
    kw, how = torch_optim_kwargs(torch.optim.SGD, device)
    sgd = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WD, **kw)
    sgd.step()  # create momentum buffers
    row(
        "sgd",
        measure(lambda: K.sgd_step_(flat, flat_grad, flat_buf, lr=LR, momentum=0.9, weight_decay=WD)),
        measure(sgd.step),
        f"torch.optim.SGD({how})",
    )

    kw, how = torch_optim_kwargs(torch.optim.AdamW, device)
    adamw = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **kw)
    adamw.step()
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    row(
        "adamw",
        measure(lambda: K.adamw_step_(flat, flat_grad, m, v, step=10, lr=LR, weight_decay=WD)),
        measure(adamw.step),
        f"torch.optim.AdamW({how})",
    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--sizes", nargs="+", type=float, help="element counts (default: 1e4..1e8 CUDA, 1e4..1e6 CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement on CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    sizes = [int(s) for s in (args.sizes or ([1e4, 1e5, 1e6, 1e7, 1e8] if device.type == "cuda" else [1e4, 1e5, 1e6]))]
    name = machine_name(device)
    backend = "triton" if device.type == "cuda" else "torch twin"
    measure, measure_pair = timer(device, args.repeats), paired_timer(device, args.repeats)

    rows = []
    for n in sizes:
        try:
            rows += bench_size(n, device, measure, measure_pair)
        except torch.OutOfMemoryError:
            print(f"skipping n={n}: out of memory", file=sys.stderr)
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
    copy_gbps = {r["n"]: r["bytes_per_element"] * r["n"] / r["seconds"] / 1e9 for r in rows if r["op"] == "copy"}
    print(f"subgrad {__version__} kernels on {name} ({device.type}, {backend}); torch {torch.__version__}")
    print(
        f"{'op':<10}{'n':>11}{'B/elem':>8}{'time us':>11}{'GB/s':>9}{'of copy':>9}{'baseline us':>13}"
        f"{'speedup':>9}  baseline"
    )
    for r in rows:
        r["gb_per_s"] = r["bytes_per_element"] * r["n"] / r["seconds"] / 1e9
        r["fraction_of_copy"] = r["gb_per_s"] / copy_gbps[r["n"]]
        r["speedup_vs_baseline"] = r["baseline_seconds"] / r["seconds"] if r["baseline_seconds"] else None
        base = (
            f"{r['baseline_seconds'] * 1e6:>13.1f}{r['speedup_vs_baseline']:>8.2f}x  {r['baseline']}"
            if r["baseline"]
            else ""
        )
        print(
            f"{r['op']:<10}{r['n']:>11}{r['bytes_per_element']:>8}{r['seconds'] * 1e6:>11.1f}{r['gb_per_s']:>9.1f}"
            f"{r['fraction_of_copy']:>9.2f}{base}"
        )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels-{device.type}-{file_label(device)}.json")
    write_result(path, dict(device=name, device_type=device.type, backend=backend, rows=rows), device, argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
