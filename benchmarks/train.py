"""Training benchmark: LeNet on the full CIFAR-10 archive, on this machine.

    python benchmarks/train.py --data ../shared/data/cifar10-jpeg.tar.gz             # everything
    python benchmarks/train.py --data ... --skip-defaults                            # throughput only

1. Throughput: subgrad SGD (device-resident loader, fused update) vs a plain torch.optim.SGD loop
   with torchvision's DataLoader (same model, batch 128, random crop + flip, 2 epochs each, 2 workers):
   images/s and seconds per epoch, measured in this run.
2. Defaults: `subgrad train --model lenet --optimizer O` for every optimizer at its defaults:
   final test accuracy, train seconds, forward passes.
Prints a table and writes results/train-<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from subgrad.data import load_cifar10
from subgrad.models import build_model
from subgrad.train import OPTIMIZERS, TrainConfig, train, versions


def torchvision_loop(data_path, epochs, batch, device):
    """The plain baseline: torchvision ImageFolder-free Dataset over the same uint8 arrays, DataLoader with
    2 workers and torchvision transforms, torch.optim.SGD."""
    import torchvision.transforms as Tr
    from PIL import Image

    ds = load_cifar10(data_path)
    mean, std = ds.channel_stats()
    transform = Tr.Compose([Tr.RandomCrop(32, padding=4, padding_mode="reflect"), Tr.RandomHorizontalFlip(),
                            Tr.ToTensor(), Tr.Normalize(mean, std)])

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the throughput comparison")
    parser.add_argument("--skip-defaults", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    result = dict(device=name, versions=versions(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), command=" ".join(["train.py"] + (argv or sys.argv[1:])))

    with tempfile.TemporaryDirectory() as tmp:
        s = train(TrainConfig(model="lenet", optimizer="sgd", data=args.data, out=f"{tmp}/tp", device=device.type,
                              epochs=args.epochs, lr=0.05, schedule="constant", quiet=True))
        ours = dict(images_per_second=s["images_per_second"], seconds_per_epoch=s["train_seconds"] / args.epochs)
    base = torchvision_loop(args.data, args.epochs, 128, device)
    result["throughput"] = dict(subgrad=ours, torchvision_dataloader=base,
                                speedup=ours["images_per_second"] / base["images_per_second"])
    print(f"LeNet, batch 128, {args.epochs} epochs on {name}:")
    print(f"  subgrad train (device loader, fused SGD): {ours['images_per_second']:8.0f} img/s  "
          f"{ours['seconds_per_epoch']:6.1f} s/epoch")
    print(f"  torch.optim.SGD + torchvision DataLoader: {base['images_per_second']:8.0f} img/s  "
          f"{base['seconds_per_epoch']:6.1f} s/epoch   -> {result['throughput']['speedup']:.2f}x")

    if not args.skip_defaults:
        rows = []
        for optimizer in OPTIMIZERS:
            with tempfile.TemporaryDirectory() as tmp:
                s = train(TrainConfig(model="lenet", optimizer=optimizer, data=args.data, out=f"{tmp}/r",
                                      device=device.type, quiet=True))
            rows.append(dict(optimizer=optimizer, test_accuracy=s["test_accuracy"], train_seconds=s["train_seconds"],
                             forward_passes=s["forward_passes"], steps=s["steps"]))
            print(f"  lenet {optimizer:<8} defaults: test accuracy {s['test_accuracy']:.4f}  {s['train_seconds']:7.1f} s"
                  f"  {s['forward_passes']} forward passes")
        result["defaults"] = rows
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train-{device.type}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
