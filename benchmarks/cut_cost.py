"""The traced block cut (subgrad/optim/activity_graph.py) against a built-in model's hand-written one: step
time of `zo` at its `subgrad train` defaults (interleaved, best of --repeats) and whether the two train to
bit-identical weights; with ``--data``, also the CIFAR-10 test accuracy each reaches after ``--train-steps``
steps on the same batches (interleaved, in this one invocation).

    python benchmarks/cut_cost.py --json benchmarks/results/cut-cost-cpu.json
    python benchmarks/cut_cost.py --models resnet20 --data ../shared/data/cifar10-jpeg.tar.gz \
        --train-steps 800 --json benchmarks/results/cut-accuracy-resnet20-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import torch

from bench_common import add_device_argument, pick_device, write_result
from subgrad.data import DeviceLoader, load_cifar10
from subgrad.models import build_model
from subgrad.optim.activity_graph import traced_blocks
from subgrad.training.config import TrainConfig
from subgrad.training.optimizers import REGISTRY
from subgrad.training.run_setup import evaluate

MODELS = ("lenet", "localnet", "resnet20")


def build(model_name: str, traced: bool, device):
    """The model and its `zo` optimizer as `subgrad train` builds them; ``traced``: the same optimizer's
    settings and heads' init on the traced cut."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device).train()
    optimizer = REGISTRY["zo"].build(TrainConfig(model=model_name, optimizer="zo").resolved(), model, None)
    if traced:
        group = optimizer.param_groups[0]
        torch.manual_seed(0)
        model = build_model(model_name).to(device).train()
        optimizer = type(optimizer)(
            model,
            lr=group["lr"],
            betas=group["betas"],
            weight_decay=group["weight_decay"],
            cut=traced_blocks(model),
            **dataclasses.asdict(optimizer.settings),
        )
    return model, optimizer


def train_both(name: str, runs: dict, data_path: str, steps: int, device) -> dict:
    """Both cuts trained ``steps`` steps on the same augmented batches (as `subgrad train` draws them, at
    the pair's default batch size), interleaved; each one's CIFAR-10 test accuracy."""
    data = load_cifar10(data_path, download=False)
    mean, std = data.channel_stats()
    batch = TrainConfig(model=name, optimizer="zo").resolved().batch_size
    train = DeviceLoader(data.train_images, data.train_labels, mean, std, batch, device, True, True, True)
    test = DeviceLoader(data.test_images, data.test_labels, mean, std, 1000, device)
    seconds = {kind: 0.0 for kind in runs}
    for step in range(steps):
        x, y = train.batch(step // len(train), step % len(train))
        for kind, (_, optimizer) in runs.items():
            start = time.perf_counter()
            optimizer.step(x, y)
            seconds[kind] += time.perf_counter() - start
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"  step {step + 1}/{steps}", flush=True)
    accuracy = {kind: evaluate(model, test, amp=False)[1] for kind, (model, _) in runs.items()}
    return dict(steps=steps, batch=batch, test_accuracy=accuracy, train_seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--data", help="CIFAR-10 (any layout subgrad reads): also train both cuts and compare accuracy")
    parser.add_argument("--train-steps", type=int, default=1000, help="steps of the accuracy comparison (default 1000)")
    add_device_argument(parser)
    args = parser.parse_args()
    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    rows = []
    for name in args.models:
        runs = {kind: build(name, kind == "traced", device) for kind in ("hand-written", "traced")}
        seconds = {kind: [] for kind in runs}
        for _ in range(args.repeats + 1):  # the first round warms up
            for kind, (_, optimizer) in runs.items():
                start = time.perf_counter()
                optimizer.step(x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[kind].append(time.perf_counter() - start)
        best = {kind: min(s[1:]) for kind, s in seconds.items()}
        weights = [list(model.parameters()) for model, _ in runs.values()]
        same = all(torch.equal(a, b) for a, b in zip(*weights))
        rows.append(dict(model=name, hand_written_s=best["hand-written"], traced_s=best["traced"]))
        rows[-1] |= dict(ratio=best["traced"] / best["hand-written"], bit_identical_weights=same)
        print(
            f"{name}: hand-written {best['hand-written'] * 1e3:.1f} ms, traced {best['traced'] * 1e3:.1f} ms "
            f"({rows[-1]['ratio']:.2f}x); weights bit-identical after {args.repeats + 1} steps: {same}",
            flush=True,
        )
        if args.data:
            runs = {kind: build(name, kind == "traced", device) for kind in ("hand-written", "traced")}
            rows[-1]["training"] = trained = train_both(name, runs, args.data, args.train_steps, device)
            acc = trained["test_accuracy"]
            print(
                f"{name}: test accuracy after {args.train_steps} steps: hand-written {acc['hand-written']:.4f}, "
                f"traced {acc['traced']:.4f} ({(acc['traced'] - acc['hand-written']) * 100:+.2f} points)",
                flush=True,
            )
    if args.json:
        write_result(args.json, dict(batch=args.batch, repeats=args.repeats, rows=rows), device)


if __name__ == "__main__":
    main()
