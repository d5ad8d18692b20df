"""Peak memory of one training step, per method, model and batch size: where forward-only training saves
memory and where it does not.

    python benchmarks/memory.py --json benchmarks/results/memory-cpu.json
    python benchmarks/memory.py --models lenet --batches 32 128          # the CI slow tier's run

Methods, each as `subgrad train` builds it at its defaults for the model (the registry in
subgrad/training/optimizers.py): ``inference`` (a no-grad forward in eval mode, the reference), ``sgd``
(backprop), ``sgd-checkpoint`` (backprop with ``torch.utils.checkpoint`` around each block of the model's
traced cut: the equal-memory baseline of "The Cost of Avoiding Backpropagation", arXiv 2506.21833),
``zo-sgd``, ``zo-adam`` (weight perturbation) and ``zo`` (ActivityZO, activity perturbation).

What is measured, after one warm-up step (so optimizer state and gradient buffers exist):

* ``persistent``: bytes of the tensors that live across steps (parameters, buffers, gradients, optimizer
  state, ActivityZO's heads) and the batch;
* ``step_peak``: on CPU, the highest sum of bytes allocated and not yet freed during the step, from torch's
  profiler (``profile_memory=True``: every allocation and free, in order); on CUDA,
  ``torch.cuda.max_memory_allocated`` over the step less what was allocated before it;
* ``peak = persistent + step_peak``, and beside it on Linux the growth of the process's resident memory
  over the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; the allocator's caching
  makes it a rough check, not the figure).

Over the batch sizes, a least-squares line gives bytes per example (the slope) and the largest batch whose
peak fits in 1 GiB (extrapolated, never found by running out of memory).  Beside each method, the test
accuracy and training seconds its `subgrad train` defaults reach on CIFAR-10 where
``results/zo-quality-[<model>-]cpu.json`` has the run (``zo_quality.py``; not the same time budget).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from bench_common import add_device_argument, pick_device, write_result
from subgrad.models import build_model
from subgrad.optim.activity_graph import traced_blocks
from subgrad.training.config import TrainConfig
from subgrad.training.optimizers import REGISTRY

METHODS = ("inference", "sgd", "sgd-checkpoint", "zo-sgd", "zo-adam", "zo")
MODELS = ("lenet", "resnet20", "localnet", "torchvision:resnet18")
BATCHES = {"torchvision:resnet18": (16, 32, 64)}  # ~13x ResNet-20's forward: smaller batches on a CPU
DEFAULT_BATCHES = (64, 256, 1024)
GIB = 2**30
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def build_step(model_name: str, method: str, x: torch.Tensor, y: torch.Tensor):
    """(the step, the objects whose tensors persist across steps)."""
    torch.manual_seed(0)
    model = build_model(model_name).to(x.device)
    if method == "inference":
        model.eval()
        return (lambda: torch.no_grad()(model)(x)), [model]
    optimizer_name = "sgd" if method == "sgd-checkpoint" else method
    cfg = TrainConfig(model=model_name, optimizer=optimizer_name).resolved()
    entry = REGISTRY[optimizer_name]
    optimizer = entry.build(cfg, model.train(), None)
    if entry.step_kind == "blocks":  # the step drops the last step's gradients first: not persistent
        return (lambda: optimizer.step(x, y)), [model, optimizer.heads, optimizer.adamw]
    if entry.step_kind == "closure":
        return (lambda: optimizer.step(lambda: F.cross_entropy(model(x), y))), [model, optimizer]
    blocks = traced_blocks(model) if method == "sgd-checkpoint" else None

    def forward():
        if blocks is None:
            return model(x)
        h = x
        for block in blocks:  # only each block's input is kept; its inside is recomputed in backward
            h = checkpoint(block, h, use_reentrant=False)
        return h

    def step():
        optimizer.zero_grad(set_to_none=False)  # as the trainer steps: gradient buffers persist
        F.cross_entropy(forward(), y).backward()
        optimizer.step()

    return step, [model, optimizer]


def persistent_bytes(objects, *batch: torch.Tensor) -> int:
    """Bytes of the distinct storages of the tensors in ``objects`` (modules, optimizers) and the batch."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            add(list(obj.parameters()) + list(obj.buffers()) + [p.grad for p in obj.parameters()])
        else:
            add([s for s in obj.state.values()] if hasattr(obj, "state") else [])
            add([p.grad for g in getattr(obj, "param_groups", []) for p in g["params"]])
    add(list(batch))
    return sum(seen.values())


def _rss(field: str) -> int | None:
    status = pathlib.Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def step_peak(step, device: torch.device) -> tuple[int, int | None]:
    """(bytes allocated at the step's peak above its start, resident-memory growth or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, None
    rss_before = _rss("VmRSS")
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        rss_before = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    rss_growth = _rss("VmHWM") - rss_before if rss_before is not None else None
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = top = 0
    for e in events:
        live += e.nbytes()
        top = max(top, live)
    return top, rss_growth


def accuracy(model_name: str, method: str) -> dict | None:
    stem = "zo-quality-cpu.json" if model_name == "lenet" else f"zo-quality-{model_name}-cpu.json"
    path = RESULTS / stem
    if not path.exists():
        return None
    run = json.loads(path.read_text()).get("runs", {}).get("sgd" if method == "sgd-checkpoint" else method)
    return None if run is None else dict(test_accuracy=run["test_accuracy"], train_seconds=run["train_seconds"])


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of peak bytes over batch size."""
    n = len(points)
    mx, my = sum(b for b, _ in points) / n, sum(p for _, p in points) / n
    var = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (p - my) for b, p in points) / var if var else 0.0
    return slope, my - slope * mx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: 64 256 1024; resnet18 16 32 64)")
    parser.add_argument("--json", type=pathlib.Path, help="write the table here")
    add_device_argument(parser)
    args = parser.parse_args()
    device = pick_device(args.device)
    rows = []
    header = f"{'model':<22}{'method':<16}{'batch':>6}{'persistent MiB':>16}{'step peak MiB':>15}{'peak MiB':>10}"
    print(header + f"{'RSS MiB':>9}")
    for model_name in args.models:
        batches = args.batches or BATCHES.get(model_name, DEFAULT_BATCHES)
        for method in args.methods:
            points = []
            for batch in batches:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
                y = torch.randint(0, 10, (batch,), generator=g).to(device)
                step, objects = build_step(model_name, method, x, y)
                step()  # warm-up: state and gradient buffers created
                if method == "zo":  # what its step does first (so they are counted once, in the step's peak)
                    objects[-1].zero_grad(set_to_none=True)
                persistent = persistent_bytes(objects, x, y)
                peak_step, rss = step_peak(step, device)
                points.append((batch, persistent + peak_step))
                rss_text = f"{rss / 2**20:9.1f}" if rss is not None else f"{'n/a':>9}"
                print(
                    f"{model_name:<22}{method:<16}{batch:>6}{persistent / 2**20:>16.1f}{peak_step / 2**20:>15.1f}"
                    f"{(persistent + peak_step) / 2**20:>10.1f}{rss_text}",
                    flush=True,
                )
                rows.append(
                    dict(model=model_name, method=method, batch=batch, persistent_bytes=persistent)
                    | dict(step_peak_bytes=peak_step, peak_bytes=persistent + peak_step, rss_growth_bytes=rss)
                )
            slope, intercept = fit(points)
            fits = math.floor((GIB - intercept) / slope) if slope > 0 and intercept < GIB else None
            summary = dict(model=model_name, method=method, bytes_per_example=slope, intercept_bytes=intercept)
            summary |= dict(largest_batch_in_1gib=fits, accuracy=accuracy(model_name, method))
            rows.append(dict(summary, summary=True))
            print(f"{'':<22}{method:<16} {slope / 2**20:.3f} MiB per example; fits 1 GiB up to batch {fits}")
    if args.json:
        write_result(args.json, dict(method="torch profiler (CPU) / max_memory_allocated (CUDA)", rows=rows), device)


if __name__ == "__main__":
    main()
