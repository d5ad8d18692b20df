"""Host cost of every optimizer step and of the trainer's step, measured without a GPU.

    python benchmarks/host_cost.py [--json PATH] [--models lenet resnet20] [--repeats 10] [--threads 1]

What a GPU step costs besides its kernels is host work: Python, argument checks, ATen dispatch, Triton
launches, and any wait for the device.  This measures it on the CPU, on the GPU code path (every subgrad
op takes its Triton path; the Triton launches are recorded and stubbed, not run), so a change that adds
host work shows here before a GPU sees it.  Per (model, step), each optimizer at its ``subgrad train``
defaults (``make_optimizer``, tensor learning rates as the trainer sets them), forward passes at batch 2:

* ``launches_per_step``: device launches: Triton kernels plus the ATen ops that compute (views and
  allocations excluded), from :func:`subgrad.testing.record_step`;
* ``syncs_per_step``: host synchronisations (:class:`subgrad.testing.SyncCounter`);
* ``replayable``: two consecutive steps record the same launches on the same buffers
  (:meth:`subgrad.testing.StepRecord.signature`), so a CUDA graph of one replays the next;
* ``host_us_per_step``: median wall time of one step here with the Triton launches stubbed: Python,
  dispatch and launch preparation, plus the CPU compute of the ATen ops at batch 2 (so an upper bound).

Against torch.optim, in the same run on the same parameters (their values and gradients copied):

* ``torch_fused_us_per_step`` / ``torch_foreach_us_per_step``: torch.optim's fused and foreach CPU steps at
  the same hyperparameters (``sgd``, ``adamw``; for the zeroth-order rows, ``SGD(momentum=0.9, fused=True)``,
  the issue's yardstick for an optimizer's own host work);
* ``sgd`` / ``adamw``: ``host_us_per_step_realloc`` (gradients reallocated before every step, as
  ``zero_grad(set_to_none=True)`` and backward leave them), ``cpu_us_per_step`` (the real CPU step: the
  twins computing), and the ratios ``host_vs_torch_fused`` and ``cpu_vs_torch_foreach``;
* ``zo-sgd``, ``zo-adam``, ``hizoo``: ``optimizer_host_us_per_step``, the step's host time less the time
  spent in its loss closure (the forward passes), and ``optimizer_host_vs_torch_fused``; ``zo`` the same with
  its blocks' clean passes, perturbed tails and local losses taken out (timed where they are called).

``optimizer`` is ``sgd``, ``adamw``, ``zo-sgd``, ``zo-adam``, ``hizoo``, ``zo`` (the optimizer's step alone:
gradients given, or its loss closure) or ``train:<optimizer>`` (the trainer's whole step, what
``--cuda-graph`` captures).  Beside each row: the last measured GPU step time, where one exists
(``benchmarks/results/gpu-*/optim-cuda-*.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench_common import write_result
from subgrad.data import Dataset
from subgrad.testing import SyncCounter, record_step, tensors_in, triton_launches
from subgrad.training.config import TrainConfig
from subgrad.training.distributed import from_environment
from subgrad.training.optimizers import OPTIMIZERS
from subgrad.training.run_setup import setup
from subgrad.training.step import TrainStep

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BATCH = 2
#: the GPU benchmark's row for an optimizer's step (benchmarks/optim.py)
GPU_ROWS = {"sgd": "sgd", "adamw": "adamw", "zo-sgd": "zo-sgd defaults", "zo-adam": "zo-adam defaults"}


def synthetic_session(model: str, optimizer: str):
    """A ``subgrad train`` session on 16 random images, batch 2, single process, CPU."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16) % 10
    data = Dataset(images, labels, images[:4], labels[:4], tuple(f"c{i}" for i in range(10)), "synthetic")
    cfg = TrainConfig(model=model, optimizer=optimizer, batch_size=BATCH, steps=1000).resolved()
    return setup(cfg, pathlib.Path("unused"), from_environment("cpu"), "cpu", data=data)


def optimizer_step(s, x, y):
    """The optimizer's own step on a fixed batch: given gradients, its loss closure, or ActivityZO's."""
    if s.step_kind == "backprop":
        torch.manual_seed(0)
        for p in s.model.parameters():
            p.grad = torch.randn_like(p)
        return s.optimizer.step
    if s.step_kind == "closure":
        return lambda: s.optimizer.step(lambda: F.cross_entropy(s.model(x), y))
    return lambda: s.optimizer.step(x, y)


def median_us(step, prepare, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``step()`` in microseconds, ``prepare(t)`` run untimed before each call."""
    samples = []
    for t in range(warmup + repeats):
        prepare(t)
        start = time.perf_counter()
        step()
        if t >= warmup:
            samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1e6, 1)


def torch_baselines(s, name: str, repeats: int) -> dict:
    """torch.optim's fused and foreach CPU steps on copies of the session's parameters and gradients."""
    params = [p for p in s.model.parameters() if p.requires_grad]
    if name in ("sgd", "adamw"):
        group = s.optimizer.param_groups[0]
        keys = (
            ("lr", "momentum", "weight_decay", "nesterov") if name == "sgd" else ("lr", "betas", "eps", "weight_decay")
        )
        settings = {k: float(group[k]) if k == "lr" else group[k] for k in keys}
        cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    else:  # the yardstick for a zeroth-order optimizer's own host work
        settings, cls = dict(lr=1e-3, momentum=0.9), torch.optim.SGD
    out = {}
    for impl in ("fused", "foreach"):
        torch.manual_seed(0)
        copies = [p.detach().clone().requires_grad_() for p in params]
        for c in copies:
            c.grad = torch.randn_like(c)
        opt = cls(copies, **settings, **{impl: True})
        out[f"torch_{impl}_us_per_step"] = median_us(opt.step, lambda t: None, max(repeats, 20))
    return out


def realloc_gradients(model):
    """A ``prepare`` that gives every parameter a fresh gradient tensor (same values) before each step."""
    params = [p for p in model.parameters() if p.grad is not None]

    def prepare(t):
        for p in params:
            p.grad = p.grad.clone()

    return prepare


def timed_closure(step_fn, s, x, y):
    """A zeroth-order step whose loss closure's time is summed into ``spent[0]``: the forward passes."""
    spent = [0.0]

    def closure():
        start = time.perf_counter()
        loss = F.cross_entropy(s.model(x), y)
        spent[0] += time.perf_counter() - start
        return loss

    return (lambda: s.optimizer.step(closure)), spent


def timed_activity_passes(optimizer, spent: list) -> None:
    """Sum into ``spent[0]`` the time ActivityZO spends in forward passes: each block's clean pass, its
    perturbed tails and the local losses (the instance's methods wrapped; nothing else changes)."""

    def timed(fn):
        def call(*args):
            start = time.perf_counter()
            out = fn(*args)
            spent[0] += time.perf_counter() - start
            return out

        return call

    for block in optimizer.blocks:
        run = block.run

        def timed_run(h, run=run):
            start = time.perf_counter()
            clean = run(h)
            spent[0] += time.perf_counter() - start
            return dataclasses.replace(clean, tail=timed(clean.tail))

        block.run = timed_run
    optimizer.local_losses = timed(optimizer.local_losses)
    optimizer._losses = timed(optimizer._losses)


def own_host_us(step, spent: list, repeats: int) -> float:
    """Median host time of ``step()`` less the forward passes it ran (``spent[0]``), launches stubbed."""
    samples = []
    with triton_launches([], run=False, force_triton=True):
        for t in range(2 + repeats):
            spent[0] = 0.0
            start = time.perf_counter()
            step()
            if t >= 2:
                samples.append(time.perf_counter() - start - spent[0])
    return round(statistics.median(samples) * 1e6, 1)


def measure(label: str, step, prepare, persistent_of, repeats: int) -> dict:
    """Launch counts, syncs and replayability from recorded steps; host time with launches stubbed."""
    with triton_launches([], run=False, force_triton=True):
        for t in range(2):  # warm-up: lazy state, first-step branches
            prepare(t)
            step()
    prepare(2)
    persistent = persistent_of()
    with SyncCounter() as syncs:
        first = record_step(step, run=False, force_triton=True)
    prepare(3)
    second = record_step(step, run=False, force_triton=True)
    samples = []
    with triton_launches([], run=False, force_triton=True):
        for t in range(repeats):
            prepare(4 + t)
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
    counts = first.counts()
    return dict(
        optimizer=label,
        launches_per_step=counts["triton"] + counts["aten"],
        triton_launches_per_step=counts["triton"],
        aten_launches_per_step=counts["aten"],
        syncs_per_step=syncs.total,
        syncs=syncs.counts,
        replayable=first.signature(persistent) == second.signature(persistent),
        host_us_per_step=round(statistics.median(samples) * 1e6, 1),
    )


def last_gpu_figures() -> tuple[dict, str | None]:
    """{(model, step name): seconds} of the newest stored GPU optimizer benchmark, and its file."""
    files = sorted(RESULTS.glob("gpu-*/optim-cuda-*.json"))
    if not files:
        return {}, None
    rows = json.loads(files[-1].read_text())["rows"]
    return {(r["model"], r["step"]): r["seconds"] for r in rows}, str(files[-1].relative_to(RESULTS.parent.parent))


def versus_torch(s, name: str, x, y, repeats: int) -> dict:
    """This row's comparison with torch.optim (module docstring), measured now on the same parameters."""
    out = torch_baselines(s, name, repeats)
    if s.step_kind == "backprop":
        step = optimizer_step(s, x, y)
        with triton_launches([], run=False, force_triton=True):
            realloc = median_us(step, realloc_gradients(s.model), repeats)
        cpu = median_us(step, lambda t: None, repeats)
        out.update(host_us_per_step_realloc=realloc, cpu_us_per_step=cpu)
        out["cpu_vs_torch_foreach"] = round(cpu / out["torch_foreach_us_per_step"], 2)
    else:
        if s.step_kind == "closure":
            step, spent = timed_closure(s.optimizer.step, s, x, y)
        else:  # ActivityZO: a copy, so the wrapped passes stay out of the other rows
            optimizer, spent = copy.deepcopy(s.optimizer), [0.0]
            timed_activity_passes(optimizer, spent)
            step = lambda: optimizer.step(x, y)  # noqa: E731
        own = out["optimizer_host_us_per_step"] = own_host_us(step, spent, repeats)
        out["optimizer_host_vs_torch_fused"] = round(own / out["torch_fused_us_per_step"], 2)
    return out


def versus_text(row: dict) -> str:
    if "host_vs_torch_fused" in row:
        return (
            f"host {row['host_vs_torch_fused']}x fused ({row['torch_fused_us_per_step']} us), realloc "
            f"{row['host_us_per_step_realloc']} us; CPU {row['cpu_us_per_step']} us = {row['cpu_vs_torch_foreach']}x "
            f"foreach ({row['torch_foreach_us_per_step']} us)"
        )
    if row.get("optimizer_host_us_per_step") is not None:
        return (
            f"own host {row['optimizer_host_us_per_step']} us = {row['optimizer_host_vs_torch_fused']}x "
            f"SGD fused ({row['torch_fused_us_per_step']} us)"
        )
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20"], choices=["lenet", "resnet20"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the step's own ops)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpu, gpu_file = last_gpu_figures()
    steps = []
    print(
        f"{'model':<9}{'step':<15}{'launches':>9}{'triton':>7}{'aten':>6}{'syncs':>6}{'replay':>7}{'host us':>10}"
        f"{'GPU ms (last measured)':>24}  vs torch.optim (same run)"
    )
    for model in args.models:
        for name in args.optimizers:
            s = synthetic_session(model, name)
            train_step = TrainStep(s, 0)  # tensor learning rates in the param groups, as in training
            twin = copy.deepcopy(train_step)
            x, y = s.train_loader.batch(0, 0)
            rows = [
                measure(
                    name,
                    optimizer_step(s, x, y),
                    lambda t: None,
                    lambda: tensors_in(s.model, s.optimizer, x, y),
                    args.repeats,
                ),
                measure(
                    f"train:{name}",
                    twin,
                    twin.prepare,
                    lambda: tensors_in(twin.s.model, twin.s.optimizer, twin.s.train_loader, twin),
                    args.repeats,
                ),
            ]
            rows[0].update(versus_torch(s, name, x, y, args.repeats))
            if "host_us_per_step_realloc" in rows[0]:
                rows[0]["host_vs_torch_fused"] = round(
                    rows[0]["host_us_per_step"] / rows[0]["torch_fused_us_per_step"], 2
                )
            for row in rows:
                row["model"] = model
                seconds = gpu.get((model, GPU_ROWS.get(row["optimizer"])))
                row["gpu_ms_last_measured"] = round(seconds * 1e3, 3) if seconds else None
                steps.append(row)
                print(
                    f"{model:<9}{row['optimizer']:<15}{row['launches_per_step']:>9}{row['triton_launches_per_step']:>7}"
                    f"{row['aten_launches_per_step']:>6}{row['syncs_per_step']:>6}{str(row['replayable']):>7}"
                    f"{row['host_us_per_step']:>10.1f}{row['gpu_ms_last_measured'] or '':>24}  {versus_text(row)}",
                    flush=True,
                )
    result = dict(
        steps=steps,
        batch=BATCH,
        repeats=args.repeats,
        threads=args.threads,
        gpu_figures=gpu_file,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_result(args.json, result, "cpu", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
