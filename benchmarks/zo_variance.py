"""How good is a forward-only estimate, layer by layer: its cosine with the exact local gradient, and its cost.

    python benchmarks/zo_variance.py --data ../shared/data/cifar10-jpeg.tar.gz --methods q1 q4 q8 patch-group2
    python benchmarks/zo_variance.py --data ... --model localnet --methods q1 p2g4 p4g4 p4g8 --steps 20
    python benchmarks/zo_variance.py --data ... --model resnet20 --methods q1 q4 --steps 50

For each method (an ActivityZO setting, METHODS: ``q1`` is one direction per example and layer with one
local loss per block; ``q4`` averages four; ``p4g4`` cuts each block's local loss into 4 x 4 patches and 4
channel groups, subgrad.optim.activity_heads.LocalHead) the optimizer steps ``--steps`` times at lr 0 on
one fixed batch of real training images (the weights never move, the directions change every step).  Per
layer it reports:

* ``cosine_1``: the mean cosine of one step's estimate with the exact gradient of the same local loss
  (autograd through the layer's block and head, the block's input held fixed): what a single step gets;
* ``cosine_avg``: the cosine of the estimate averaged over the steps (variance shrinks, bias stays);
* the step's wall time in units of one clean forward pass of the model on the batch (``step_forwards``).

An idea that lowers the estimate's noise shows as a higher ``cosine_1`` in the layers it targets; the cost
column says what it pays.  Writes results/zo-variance-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import torch
import torch.nn.functional as F

from bench_common import add_device_argument, pick_device
from subgrad.data import DeviceLoader, load_cifar10
from subgrad.models import build_model
from subgrad.optim import ActivityZO
from subgrad.run_folder import versions

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
#: method name -> ActivityZO keyword arguments (the others at ActivityZO's defaults; LeNet's patch is 7 x 7)
METHODS = {
    "q1": dict(q=1),
    "q2": dict(q=2),
    "q4": dict(q=4),
    "q8": dict(q=8),
    "q8-linear16": dict(q=8, q_linear=16),  # more directions on the fully connected layers only
    "q8-linear32": dict(q=8, q_linear=32),
    "patch": dict(patches=7),
    "patch-norm": dict(patches=7, norm=True),
    "group2": dict(groups=2),
    "patch-group2": dict(patches=7, groups=2),
    "p2": dict(patches=2),
    "p4": dict(patches=4),
    "p2g4": dict(patches=2, groups=4),
    "p4g4": dict(patches=4, groups=4),
    # BatchNorm's batch statistics held fixed, as the tails measure (resnet20; the others have no BatchNorm)
    "p4g4-fixed-stats": dict(patches=4, groups=4, through_batch_stats=False),
    "p4g8": dict(patches=4, groups=8),
    "p4g4-norm": dict(patches=4, groups=4, norm=True),
    "g8": dict(groups=8),
    "p2g8": dict(patches=2, groups=8),
    "q2-p4g4": dict(q=2, patches=4, groups=4),  # localnet's zo default
}


def exact_local_gradients(opt: ActivityZO, x: torch.Tensor, y: torch.Tensor):
    """Per site layer (``block<b>.site<j>``): the layer, and the autograd gradient of its block's local loss
    with respect to its parameters (the block's input held fixed)."""
    layers, grads, h = {}, {}, x
    for b, block in enumerate(opt.blocks):
        with torch.enable_grad():
            record = block.run(h)
            loss = opt.local_losses(b, record.out, y)[0].sum(0).mean()
            site_params = [list(site.layer.parameters()) for site in record.sites]
            flat = torch.autograd.grad(loss, [p for ps in site_params for p in ps])
        start = 0
        for j, (site, params) in enumerate(zip(record.sites, site_params)):
            layers[f"block{b}.site{j}"] = site.layer
            grads[f"block{b}.site{j}"] = torch.cat([g.flatten() for g in flat[start : start + len(params)]])
            start += len(params)
        h = record.out.detach()
    return layers, grads


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        return (time.perf_counter() - start) / repeats


def measure(method: str, model_name: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name).to(x.device).train()
    opt = ActivityZO(model, lr=0.0, seed=3, example=x[:1], **METHODS[method])
    layers, truth = exact_local_gradients(opt, x, y)
    single = {name: 0.0 for name in layers}
    total = {name: torch.zeros_like(g) for name, g in truth.items()}
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        opt.step(x, y)
        for name, layer in layers.items():
            estimate = torch.cat([p.grad.flatten() for p in layer.parameters()])
            single[name] += F.cosine_similarity(estimate, truth[name], dim=0).item() / steps
            total[name] += estimate
    step_seconds = (time.perf_counter() - start) / steps
    rows = {
        name: dict(
            parameters=truth[name].numel(),
            cosine_1=round(single[name], 4),
            cosine_avg=round(F.cosine_similarity(total[name], truth[name], dim=0).item(), 4),
        )
        for name in layers
    }
    return dict(
        method=method,
        settings=METHODS[method],
        steps=steps,
        step_seconds=step_seconds,
        step_forwards=step_seconds / forward_seconds(model, x),
        layers=rows,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="lenet", choices=["lenet", "resnet20", "localnet"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=100, help="steps per method (lr 0, new directions each)")
    parser.add_argument("--batch", type=int, default=128)
    add_device_argument(parser)
    parser.add_argument("--json", type=pathlib.Path, help="default: results/zo-variance-<model>-<device>.json")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    ds = load_cifar10(args.data)
    mean, std = ds.channel_stats()
    loader = DeviceLoader(ds.train_images, ds.train_labels, mean, std, args.batch, device, shuffle=True, order_seed=0)
    x, y = loader.batch(0, 0)
    results = [measure(method, args.model, x, y, args.steps) for method in args.methods]
    print(f"{args.model}, batch {args.batch}, {args.steps} steps at lr 0 per method, {device.type}")
    widths = [max(11, len(m) + 6) for m in args.methods]  # a column pair per method, wide enough for its name
    print(
        f"{'layer':<14}{'params':>9}"
        + "".join(f"{m + ' cos1':>{w}}{m + ' avg':>{w}}" for m, w in zip(args.methods, widths))
    )
    for name in results[0]["layers"]:
        cells = "".join(
            f"{r['layers'][name]['cosine_1']:>{w}.3f}{r['layers'][name]['cosine_avg']:>{w}.3f}"
            for r, w in zip(results, widths)
        )
        print(f"{name:<14}{results[0]['layers'][name]['parameters']:>9}{cells}")
    print(
        f"{'step cost':<23}"
        + "".join(f"{r['step_forwards']:>{2 * w - 9}.1f} forwards" for r, w in zip(results, widths))
    )
    out = args.json or RESULTS / f"zo-variance-{args.model}-{device.type}.json"
    out.write_text(
        json.dumps(
            dict(
                model=args.model,
                batch=args.batch,
                device=device.type,
                versions=versions(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                methods=results,
            ),
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
