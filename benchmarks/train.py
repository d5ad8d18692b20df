"""Training benchmark: LeNet on the full CIFAR-10 archive, on this machine.

    python benchmarks/train.py --data ../shared/data/cifar10-jpeg.tar.gz             # everything
    python benchmarks/train.py --data ... --skip-defaults                            # throughput only

1. Throughput: subgrad SGD (device-resident loader, fused update) vs a plain torch.optim.SGD loop
   with torchvision's DataLoader (same model, batch 128, random crop + flip, 2 epochs each, 2 workers):
   images/s and seconds per epoch, measured in this run.
2. Defaults: `subgrad train --model lenet --optimizer O` for every optimizer at its defaults:
   final test accuracy, train seconds, forward passes.
3. With --loops (CUDA): `subgrad train --model M --optimizer sgd` at its defaults (a CUDA graph per
   step) against a plain torch loop over the same device-resident batches (subgrad's DeviceLoader) with
   torch.optim.SGD(fused=True), and against that loop's step under torch.compile(mode="reduce-overhead"),
   for LeNet and ResNet-20, the same number of steps each: training seconds and test accuracy.
Prints a table and writes results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from bench_common import add_device_argument, machine_name, pick_device, write_result
from subgrad.data import load_cifar10
from subgrad.models import build_model
from subgrad.training.config import TrainConfig
from subgrad.training.loop import train
from subgrad.training.optimizers import OPTIMIZERS


def torchvision_loop(data_path, epochs, batch, device):
    """The plain baseline: torchvision ImageFolder-free Dataset over the same uint8 arrays, DataLoader with
    2 workers and torchvision transforms, torch.optim.SGD."""
    import torchvision.transforms as Tr
    from PIL import Image

    ds = load_cifar10(data_path)
    mean, std = ds.channel_stats()
    transform = Tr.Compose(
        [
            Tr.RandomCrop(32, padding=4, padding_mode="reflect"),
            Tr.RandomHorizontalFlip(),
            Tr.ToTensor(),
            Tr.Normalize(mean, std),
        ]
    )

    class Set(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds.train_labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(ds.train_images[i])), int(ds.train_labels[i])

    loader = torch.utils.data.DataLoader(Set(), batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    torch.manual_seed(0)
    model = build_model("lenet").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    seconds = time.perf_counter() - start
    return dict(images_per_second=epochs * len(loader) * batch / seconds, seconds_per_epoch=seconds / epochs)


def device_loop(data_path, model_name: str, device, compiled: bool) -> dict:
    """A plain torch loop at the `subgrad train --optimizer sgd` defaults of ``model_name``: the same
    device-resident batches, torch.optim.SGD(fused=True), the same onecycle schedule; with ``compiled`` the
    model runs under torch.compile(mode="reduce-overhead") (forward and backward as CUDA graphs; the
    optimizer step stays eager, as torch's tutorials pair them)."""
    from subgrad.data import DeviceLoader
    from subgrad.training.run_setup import evaluate
    from subgrad.training.step import lr_factor

    cfg = TrainConfig(model=model_name, optimizer="sgd", data=data_path).resolved()
    ds = load_cifar10(data_path)
    mean, std = ds.channel_stats()
    loader = DeviceLoader(
        ds.train_images,
        ds.train_labels,
        mean,
        std,
        cfg.batch_size,
        device,
        augment=True,
        shuffle=True,
        drop_last=True,
        order_seed=cfg.seed,
        augment_seed=cfg.seed + 1,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(model_name).to(device)
    forward = torch.compile(model, mode="reduce-overhead") if compiled else model
    lr = torch.tensor(cfg.lr, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    total = round(cfg.epochs * len(loader))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for t in range(total):
        lr.fill_(cfg.lr * lr_factor(cfg.schedule, t, total))
        if compiled:  # a new step: the graphs may overwrite the last step's outputs (torch's rule)
            torch.compiler.cudagraph_mark_step_begin()
        x, y = loader.batch(*divmod(t, len(loader)))
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    test = DeviceLoader(ds.test_images, ds.test_labels, mean, std, 1000, device)
    return dict(train_seconds=seconds, steps=total, test_accuracy=evaluate(model, test, False)[1])


def loops(data_path, device, models) -> list[dict]:
    rows = []
    for model_name in models:
        with tempfile.TemporaryDirectory() as tmp:
            s = train(
                TrainConfig(
                    model=model_name, optimizer="sgd", data=data_path, out=f"{tmp}/r", device=device.type, quiet=True
                )
            )
        row = dict(
            model=model_name,
            subgrad=dict(train_seconds=s["train_seconds"], steps=s["steps"], test_accuracy=s["test_accuracy"]),
            torch_loop=device_loop(data_path, model_name, device, compiled=False),
            torch_compile_reduce_overhead=device_loop(data_path, model_name, device, compiled=True),
        )
        for key in ("torch_loop", "torch_compile_reduce_overhead"):
            row[f"speedup_vs_{key}"] = row[key]["train_seconds"] / row["subgrad"]["train_seconds"]
        rows.append(row)
        print(
            f"  {model_name:<9} sgd defaults, {s['steps']} steps: subgrad {s['train_seconds']:7.1f} s "
            f"(acc {s['test_accuracy']:.4f}); torch loop {row['torch_loop']['train_seconds']:7.1f} s "
            f"({row['speedup_vs_torch_loop']:.2f}x); torch.compile reduce-overhead "
            f"{row['torch_compile_reduce_overhead']['train_seconds']:7.1f} s "
            f"({row['speedup_vs_torch_compile_reduce_overhead']:.2f}x)"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    add_device_argument(parser)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the throughput comparison")
    parser.add_argument("--skip-defaults", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--loops", action="store_true", help="CUDA: subgrad train vs plain and compiled torch loops")
    parser.add_argument(
        "--loop-models",
        nargs="+",
        default=["lenet", "resnet20"],
        choices=["lenet", "resnet20"],
        help="the models --loops trains (each at its sgd defaults)",
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    name = machine_name(device)
    result = dict(device=name)

    if args.loops:
        if device.type != "cuda":
            parser.error("--loops compares CUDA-graph training with torch's loops: it needs --device cuda")
        print(f"subgrad train vs torch loops on {name}:")
        result["loops"] = loops(args.data, device, args.loop_models)
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            s = train(
                TrainConfig(
                    model="lenet",
                    optimizer="sgd",
                    data=args.data,
                    out=f"{tmp}/tp",
                    device=device.type,
                    epochs=args.epochs,
                    lr=0.05,
                    schedule="constant",
                    quiet=True,
                )
            )
            ours = dict(images_per_second=s["images_per_second"], seconds_per_epoch=s["train_seconds"] / args.epochs)
        base = torchvision_loop(args.data, args.epochs, 128, device)
        result["throughput"] = dict(
            subgrad=ours, torchvision_dataloader=base, speedup=ours["images_per_second"] / base["images_per_second"]
        )
        print(f"LeNet, batch 128, {args.epochs} epochs on {name}:")
        print(
            f"  subgrad train (device loader, fused SGD): {ours['images_per_second']:8.0f} img/s  "
            f"{ours['seconds_per_epoch']:6.1f} s/epoch"
        )
        print(
            f"  torch.optim.SGD + torchvision DataLoader: {base['images_per_second']:8.0f} img/s  "
            f"{base['seconds_per_epoch']:6.1f} s/epoch   -> {result['throughput']['speedup']:.2f}x"
        )

    if not args.skip_defaults:
        rows = []
        for optimizer in OPTIMIZERS:
            with tempfile.TemporaryDirectory() as tmp:
                s = train(
                    TrainConfig(
                        model="lenet",
                        optimizer=optimizer,
                        data=args.data,
                        out=f"{tmp}/r",
                        device=device.type,
                        quiet=True,
                    )
                )
            rows.append(
                dict(
                    optimizer=optimizer,
                    test_accuracy=s["test_accuracy"],
                    train_seconds=s["train_seconds"],
                    forward_passes=s["forward_passes"],
                    steps=s["steps"],
                )
            )
            print(
                f"  lenet {optimizer:<8} defaults: test accuracy {s['test_accuracy']:.4f}  {s['train_seconds']:7.1f} s"
                f"  {s['forward_passes']} forward passes"
            )
        result["defaults"] = rows
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train-{device.type}.json")
    write_result(path, result, device, argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
