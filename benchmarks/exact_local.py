"""The ceiling of ``--optimizer zo``'s objective: the same blocks, heads and local losses trained with exact
local gradients (autograd through each block alone, its input held fixed), AdamW and a cosine schedule.

    python benchmarks/exact_local.py --data ../shared/data/cifar10-jpeg.tar.gz --model resnet20 --steps 3000

``zo`` estimates these very gradients with forward passes only, so the gap between this script's curve and
``zo``'s is what the estimate's noise costs, and the gap to backprop is what the local losses cost.  A
diagnostic that uses autograd, not a subgrad training mode.  BatchNorm scale and shift stay untrained, as
in ``zo``.  Prints one JSON line per evaluation and writes results/exact-local-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import time

import torch

from bench_common import add_device_argument, machine_name, pick_device
from subgrad.data import DeviceLoader, load_cifar10
from subgrad.models import build_model
from subgrad.optim import ActivityZO
from subgrad.optim.activity_blocks import untrained_parameters
from subgrad.run_folder import versions

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="./data", help="CIFAR-10 (as subgrad train --data)")
    parser.add_argument("--model", default="resnet20", choices=("lenet", "resnet20", "localnet"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patches", type=int, default=4, help="local losses' parts, as zo's --patches")
    parser.add_argument("--groups", type=int, default=4, help="as zo's --groups")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--json", type=pathlib.Path, help="default: results/exact-local-<model>-<device>.json")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    ds = load_cifar10(args.data)
    mean, std = ds.channel_stats()
    train = DeviceLoader(
        ds.train_images, ds.train_labels, mean, std, args.batch_size, device, shuffle=True, drop_last=True
    )
    test = DeviceLoader(ds.test_images, ds.test_labels, mean, std, 1000, device)
    model = build_model(args.model).to(device).train()
    # the optimizer only supplies the block cut and the heads; its own step is never called
    zo = ActivityZO(model, lr=0.0, patches=args.patches, groups=args.groups)
    trained = zo.adamw.param_groups[0]["params"]  # the sites' layers and the heads, as zo trains them
    named = dict(model.named_parameters())
    for name in untrained_parameters(model, zo.blocks):  # BatchNorm scale and shift: untrained, as in zo
        named[name].requires_grad_(False)
    adamw = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    curve, step, start = [], 0, time.perf_counter()
    while step < args.steps:
        for x, y in train.epoch(step // len(train)):
            h = x
            for b, block in enumerate(zo.blocks):
                with torch.enable_grad():
                    out = block.run(h).out
                    zo.local_losses(b, out, y)[0].sum(0).mean().backward()
                h = out.detach()  # no signal crosses blocks
            adamw.step()
            adamw.zero_grad()
            schedule.step()
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                model.eval()
                with torch.no_grad():
                    correct = sum((model(xt).argmax(1) == yt).sum().item() for xt, yt in test.epoch(0))
                model.train()
                curve.append(
                    dict(step=step, test_accuracy=correct / len(ds.test_labels), seconds=time.perf_counter() - start)
                )
                print(json.dumps(curve[-1]), flush=True)
            if step == args.steps:
                break
    out = args.json or RESULTS / f"exact-local-{args.model}-{device.type}.json"
    record = dict(
        date=datetime.date.today().isoformat(),
        machine=machine_name(device.type),
        settings=vars(args) | dict(json=str(out)),
        curve=curve,
        **versions(),
    )
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
