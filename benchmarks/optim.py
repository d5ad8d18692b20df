"""Optimizer-step benchmark on the seed LeNet and on ResNet-20, CIFAR-10-shaped batches.

    python benchmarks/optim.py                      # batch 256; CUDA when available
    python benchmarks/optim.py --batch 128 --repeats 5 --out benchmarks/results/

Rows, each timed in this run:
  zosgd q=1 / q=8, sequential  ZOSGD.step(closure): 2q forward passes + perturb/update kernels
  zosgd q=1 / q=8, batched     ZOSGD.step(functional_closure=...): the 2q points in one torch.func.vmap
  sgd / adamw                  subgrad.optim.SGD/AdamW.step() vs torch.optim's fastest path here
                               (fused on CUDA when supported, else foreach; plain on CPU), gradients given
  sgd / adamw compiled         torch.compile(opt.step) (PyTorch's recipe for compiling an optimizer) vs
                               the same recipe on torch.optim's default implementation
  zo-sgd / zo-adam defaults    the `subgrad train --model lenet` zeroth-order defaults (batch 512):
                               the optimizer's own share of a step = 1 - (forward passes x one
                               forward's time) / step time, i.e. what perturbation, update and
                               bookkeeping add to the forwards the estimate needs
On CUDA also, each as a CUDA graph (subgrad.capture.CudaGraphStep) beside its eager form:
  sgd / adamw eager, graphed   vs torch.optim fused eager, and fused (+ capturable) in a graph
  zosgd q=1 graphed            vs its two forward passes in a graph (target: at most 1.25x)
  zo-sgd / zo-adam defaults graphed   the optimizer's share with step and forwards graphed (target <= 10%)
Peak memory (CUDA only: torch.cuda.max_memory_allocated) is reported relative to a forward-only
inference pass of the same batch; on CPU it is not measured.  Writes JSON next to kernels.py's.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench_common import add_device_argument, file_label, machine_name, pick_device, write_result
from subgrad import __version__
from subgrad.models import build_model
from subgrad.optim import SGD, ZOSGD, AdamW


def measure(fn, device, repeats):
    """Median seconds of fn() after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_bytes(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def torch_fastest(cls, params, device, **kw):
    for extra, name in (({"fused": True}, "fused"), ({"foreach": True}, "foreach")):
        if device.type == "cpu" and name == "fused":
            continue
        try:
            return cls(params, **kw, **extra), name
        except (RuntimeError, ValueError):
            pass
    return cls(params, **kw), "plain"


def bench_model(name, device, batch, repeats):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []

    def add(label, seconds, baseline=None, baseline_name=None, peak=None, inference_peak=None, passes=None):
        rows.append(
            dict(
                model=name,
                step=label,
                seconds=seconds,
                baseline=baseline_name,
                baseline_seconds=baseline,
                speedup=(baseline / seconds) if baseline else None,
                forward_passes=passes,
                peak_bytes=peak,
                peak_vs_inference=(peak / inference_peak) if peak and inference_peak else None,
            )
        )

    base = build_model(name).to(device)
    if name == "resnet20":  # running statistics cannot be updated under vmap; ZO steps use batch statistics
        torch.func.replace_all_batch_norm_modules_(base)

    def inference():
        with torch.no_grad():
            base(x)

    inference_peak = peak_bytes(inference, device)

    for q in (1, 8):
        model = copy.deepcopy(base)
        opt = ZOSGD(model.named_parameters(), lr=1e-3, q=q)
        closure = lambda: F.cross_entropy(model(x), y)
        fclosure = lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)
        seq = measure(lambda: opt.step(closure), device, repeats)
        add(
            f"zosgd q={q} sequential",
            seq,
            passes=2 * q,
            peak=peak_bytes(lambda: opt.step(closure), device),
            inference_peak=inference_peak,
        )
        bat = measure(lambda: opt.step(functional_closure=fclosure), device, repeats)
        add(
            f"zosgd q={q} batched",
            bat,
            baseline=seq,
            baseline_name="sequential",
            passes=2 * q,
            peak=peak_bytes(lambda: opt.step(functional_closure=fclosure), device),
            inference_peak=inference_peak,
        )

    for ours_cls, torch_cls, kw in (
        (SGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
        (AdamW, torch.optim.AdamW, dict(lr=1e-3)),
    ):
        ours_model, their_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (ours_model, their_model):
            F.cross_entropy(m(x), y).backward()
        ours = ours_cls(ours_model.parameters(), **kw)
        theirs, how = torch_fastest(torch_cls, their_model.parameters(), device, **kw)
        t_theirs = measure(theirs.step, device, repeats)
        add(
            ours_cls.__name__.lower(),
            measure(ours.step, device, repeats),
            baseline=t_theirs,
            baseline_name=f"torch.optim.{torch_cls.__name__}({how})",
        )
        ours_model, their_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (ours_model, their_model):
            F.cross_entropy(m(x), y).backward()
        ours_compiled = torch.compile(ours_cls(ours_model.parameters(), **kw).step)
        theirs_compiled = torch.compile(torch_cls(their_model.parameters(), **kw).step)
        for _ in range(3):  # compilation and warm-up
            ours_compiled(), theirs_compiled()
        add(
            f"{ours_cls.__name__.lower()} compiled",
            measure(ours_compiled, device, repeats),
            baseline=measure(theirs_compiled, device, repeats),
            baseline_name=f"torch.compile(torch.optim.{torch_cls.__name__}.step)",
        )
    if device.type == "cuda":
        rows += graphed_rows(name, base, x, y, device, repeats)
    return rows


def graphed(fn):
    """``fn`` as a CUDA graph (subgrad.capture.CudaGraphStep), warmed up and captured."""
    from subgrad.capture import CudaGraphStep

    graph = CudaGraphStep(fn)
    for _ in range(graph.warmup + 1):
        graph()
    return graph


def per_call(fn, device, repeats, inner=20):
    """Median seconds per call of ``fn`` over ``inner`` back-to-back calls (one sync per sample: a graph
    replay is tens of microseconds, comparable to a synchronisation)."""
    return measure(lambda: [fn() for _ in range(inner)], device, repeats) / inner


def graphed_rows(name, base, x, y, device, repeats):
    """CUDA only: each step eager and as a CUDA graph (subgrad.capture.CudaGraphStep), against torch.optim
    fused eager and fused + capturable in a graph (eager against eager, graph against graph), and the
    ZOSGD q = 1 central step against its two forward passes, both graphed."""
    rows = []

    def add(label, seconds, baseline_name=None, baseline=None, passes=None):
        rows.append(
            dict(
                model=name,
                step=label,
                seconds=seconds,
                baseline=baseline_name,
                baseline_seconds=baseline,
                speedup=(baseline / seconds) if baseline else None,
                forward_passes=passes,
                peak_bytes=None,
                peak_vs_inference=None,
            )
        )

    configs = (
        (SGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4), {}),
        (AdamW, torch.optim.AdamW, dict(lr=1e-3), dict(capturable=True)),
    )
    for ours_cls, torch_cls, kw, capture_kw in configs:
        models = [copy.deepcopy(base) for _ in range(4)]
        for m in models:
            F.cross_entropy(m(x), y).backward()
        ours_eager = ours_cls(models[0].parameters(), **kw)
        ours_graph = ours_cls(models[1].parameters(), **kw, **capture_kw)
        theirs_eager = torch_cls(models[2].parameters(), **kw, fused=True)
        theirs_graph = torch_cls(models[3].parameters(), **kw, fused=True, **capture_kw)
        label = ours_cls.__name__.lower()
        fused = f"torch.optim.{torch_cls.__name__}(fused)"
        add(
            f"{label} eager",
            per_call(ours_eager.step, device, repeats),
            fused,
            per_call(theirs_eager.step, device, repeats),
        )
        add(
            f"{label} graphed",
            per_call(graphed(ours_graph.step), device, repeats),
            fused + " graphed",
            per_call(graphed(theirs_graph.step), device, repeats),
        )

    model = copy.deepcopy(base)
    opt = ZOSGD(model.named_parameters(), lr=torch.tensor(1e-3, device=device), q=1)
    closure = lambda: F.cross_entropy(model(x), y)

    def two_forwards():
        with torch.no_grad():
            closure()
            closure()

    forwards = per_call(graphed(two_forwards), device, repeats)
    add(
        "zosgd q=1 graphed",
        per_call(graphed(lambda: opt.step(closure)), device, repeats),
        "its 2 forwards, graphed",
        forwards,
        passes=2,
    )
    return rows


def zo_default_shares(device, repeats, batch=512):
    """Optimizer's own share of a LeNet step at the zo-sgd and zo-adam training defaults."""
    from subgrad.training.config import TrainConfig
    from subgrad.training.run_setup import make_optimizer

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for optimizer in ("zo-sgd", "zo-adam"):
        cfg = TrainConfig(model="lenet", optimizer=optimizer).resolved()
        model = build_model("lenet").to(device)
        opt = make_optimizer(cfg, model)
        closure = lambda: F.cross_entropy(model(x), y)
        passes_before = opt.forward_passes
        opt.step(closure)  # warm-up, and count the step's forward passes
        passes = opt.forward_passes - passes_before

        def forwards():
            with torch.no_grad():
                for _ in range(passes):
                    closure()

        # Interleaved and best-of: this VM's speed drifts by tens of percent between seconds, and the share
        # compares two timings, so both are taken under the same conditions and the least disturbed run kept.
        step_times, forward_times = [], []
        for _ in range(max(10, repeats)):
            step_times.append(measure(lambda: opt.step(closure), device, 1))
            forward_times.append(measure(forwards, device, 1))
        step, fwd = min(step_times), min(forward_times) / passes
        rows.append(
            dict(
                model="lenet",
                step=f"{optimizer} defaults",
                seconds=step,
                forward_seconds=fwd,
                forward_passes=passes,
                optimizer_share=1.0 - passes * fwd / step,
                baseline=None,
                baseline_seconds=None,
                speedup=None,
                peak_bytes=None,
                peak_vs_inference=None,
            )
        )
        if device.type == "cuda":  # the same share with both the step and the forwards as CUDA graphs
            for g in opt.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=device)
            step, fwd = (per_call(graphed(fn), device, repeats) for fn in (lambda: opt.step(closure), forwards))
            rows.append(
                dict(
                    model="lenet",
                    step=f"{optimizer} defaults graphed",
                    seconds=step,
                    forward_seconds=fwd / passes,
                    forward_passes=passes,
                    optimizer_share=1.0 - fwd / step,
                    baseline=None,
                    baseline_seconds=None,
                    speedup=None,
                    peak_bytes=None,
                    peak_vs_inference=None,
                )
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20"])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    name = machine_name(device)
    rows = [r for m in args.models for r in bench_model(m, device, args.batch, args.repeats)]
    rows += zo_default_shares(device, args.repeats)

    print(
        f"subgrad {__version__} optimizer steps on {name} ({device.type}), batch {args.batch}; "
        f"torch {torch.__version__}"
    )
    print(f"{'model':<10}{'step':<24}{'ms':>9}{'fwd':>5}{'speedup':>9}  {'vs':<32}{'peak/inference':>15}")
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        peak = f"{r['peak_vs_inference']:.2f}x" if r["peak_vs_inference"] else ("n/a" if r["forward_passes"] else "")
        print(
            f"{r['model']:<10}{r['step']:<24}{r['seconds'] * 1e3:>9.2f}{r['forward_passes'] or '':>5}{speed:>9}  "
            f"{r['baseline'] or '':<32}{peak:>15}"
        )
        if "optimizer_share" in r:
            print(
                f"{'':<10}  optimizer's own share of the step: {r['optimizer_share']:.1%} "
                f"({r['forward_passes']} forwards x {r['forward_seconds'] * 1e3:.2f} ms)"
            )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"optim-{device.type}-{file_label(device)}.json")
    write_result(path, dict(device=name, device_type=device.type, batch=args.batch, rows=rows), device, argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
