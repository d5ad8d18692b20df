"""Do ZOSGD, ZOAdam and HiZOO train with their library defaults?  Each optimizer is built as a new user
would build it, ``Opt(model.named_parameters())`` (or with ``lr`` only, ``--lr``), and takes 200 steps; the
loss on a fixed evaluation set is measured before and after.

Models: the README's small user CNN on one fixed batch of 64 random inputs (the loss falls only by fitting
it: the README test's setting), and LeNet and ResNet-20 on CIFAR-10 (batches of 64 shuffled training images;
evaluation on the first 2,000 test images, used for nothing else).

    python benchmarks/zo_defaults.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --json benchmarks/results/zo-defaults-cpu.json
    python benchmarks/zo_defaults.py --models lenet --optimizers ZOSGD --settings '{"clip": 0.2}' --lr 1e-2

``--settings`` (JSON keyword arguments) explores settings other than the defaults; a result records them.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_common import add_device_argument, pick_device, write_result
from subgrad.data import load_cifar10
from subgrad.models import build_model
from subgrad.optim import ZOSGD, HiZOO, ZOAdam

STEPS = 200  # the yardstick: a new user's first look at the loss
BATCH = 64
EVAL_IMAGES = 2000
OPTIMIZERS = {"ZOSGD": ZOSGD, "ZOAdam": ZOAdam, "HiZOO": HiZOO}
MODELS = ("cnn", "lenet", "resnet20")


def small_cnn() -> nn.Module:
    """The README test's user model: conv 3->8, ReLU, max-pool, linear to 10 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)
    )


def batches(model_name: str, data, device) -> tuple[list, tuple]:
    """(STEPS training batches, the evaluation batch)."""
    if model_name == "cnn":
        g = torch.Generator().manual_seed(1)
        fixed = (torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
        fixed = tuple(t.to(device) for t in fixed)
        return [fixed] * STEPS, fixed
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in data.channel_stats())

    def prepare(images, labels):
        x = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float().div_(255)
        return (x - mean) / std, torch.as_tensor(labels, device=device).long()

    order = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))[: STEPS * BATCH]
    train = [prepare(data.train_images[i.numpy()], data.train_labels[i.numpy()]) for i in order.split(BATCH)]
    return train, prepare(data.test_images[:EVAL_IMAGES], data.test_labels[:EVAL_IMAGES])


@torch.no_grad()
def eval_loss(model: nn.Module, batch: tuple) -> float:
    """Mean loss in training mode (BatchNorm on each 500-image chunk's statistics: at 200 steps the running
    statistics are still mostly their initial values, and their drift would pass for learning), on a copy so
    that the running statistics the optimizer's steps see are untouched."""
    model = copy.deepcopy(model)
    loss = float(sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in zip(*(t.split(500) for t in batch))))
    return loss / len(batch[1])


def measure(model_name: str, optimizer: str, settings: dict, data, device) -> dict:
    torch.manual_seed(0)
    model = (small_cnn() if model_name == "cnn" else build_model(model_name)).to(device).train()
    train, evaluation = batches(model_name, data, device)
    opt = OPTIMIZERS[optimizer](model.named_parameters(), **settings)
    before, losses, start = eval_loss(model, evaluation), [], time.perf_counter()
    for x, y in train:
        losses.append(float(opt.step(lambda: F.cross_entropy(model(x), y))))
    after = eval_loss(model, evaluation)
    finite = all(v == v and abs(v) < float("inf") for v in losses)
    return dict(
        model=model_name,
        optimizer=optimizer,
        settings=settings,
        eval_loss_before=round(before, 4),
        eval_loss_after=round(after, 4),
        ratio=round(after / before, 4),
        max_train_loss=round(max(losses), 3),
        trains=finite and after < before,
        seconds=round(time.perf_counter() - start, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz", help="CIFAR-10 (subgrad --data)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--lr", type=float, help="give lr (default: the optimizer's own default)")
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON keyword arguments over the defaults")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    add_device_argument(parser)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    data = load_cifar10(args.data) if set(args.models) - {"cnn"} else None
    settings = dict(args.settings, **({} if args.lr is None else {"lr": args.lr}))
    rows = []
    for model_name in args.models:
        for optimizer in args.optimizers:
            rows.append(measure(model_name, optimizer, settings, data, device))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        write_result(args.json, dict(steps=STEPS, batch=BATCH, eval_images=EVAL_IMAGES, rows=rows), device)


if __name__ == "__main__":
    main()
