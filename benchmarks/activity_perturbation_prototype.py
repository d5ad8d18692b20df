"""Issue 14 prototype: LeNet trained forward-only by per-example activity perturbation with local losses.

    python benchmarks/activity_perturbation_prototype.py --data ../shared/data/cifar10-jpeg.tar.gz --seconds 200

Not yet a subgrad optimizer (no Triton kernel, no `--optimizer zo`, no resume or data parallel): a
measurement of the method issue 14 asks for, so the next step builds on numbers.  Method (after Ren,
Kornblith, Liao and Hinton, 2022), autograd disabled for the whole run:

* every layer k (conv1, conv2, fc1, fc2, fc3) is a block with its own loss: a training-only linear head
  on its output (conv1: average-pooled to 4x4), fc3 is the classifier itself; each block's input is the
  previous block's output, so no signal crosses blocks;
* per example i, the block's pre-activation z_i is perturbed along its own Gaussian direction u_i (units a
  ReLU switches off are not perturbed), the per-example local losses give a forward difference
  d_i = (L_i(z_i + eps u_i) - L_i(z_i)) / eps, and g_i = d_i u_i estimates dL_i/dz_i: one scalar per
  example and block, its variance divided by the batch instead of shared by it;
* the layer's weight gradient is the layer-local product of g with the block input (``g^T x``; for a
  convolution ``torch.nn.grad.conv2d_weight``), the head's from a perturbation of its 10 logits; Adam on all.

One step = one clean forward plus one perturbed forward of each block's tail (counted as 2 forward
passes).  Memory beyond inference: the block's activation and its direction (one batch of activations
at a time), the heads (6,870 parameters) and Adam's two moments.  Prints test accuracy every
``--eval-every`` training seconds (evaluation time excluded) and writes results/activity-prototype-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from subgrad.data import DeviceLoader, load_cifar10

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class LocalLeNet:
    """subgrad's LeNet (same layers) plus training-only heads; every block trained by its local loss."""

    def __init__(self, head_pool: int = 4):
        self.layers = [nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5), nn.Linear(400, 120), nn.Linear(120, 84),
                       nn.Linear(84, 10)]
        self.heads = [nn.Linear(6 * head_pool * head_pool, 10), nn.Linear(400, 10), nn.Linear(120, 10),
                      nn.Linear(84, 10)]
        self.head_pool = head_pool

    def parameters(self):
        return [p for m in self.layers + self.heads for p in m.parameters()]

    @staticmethod
    def activation(k: int, z: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return F.max_pool2d(F.relu(z), 2)
        if k == 1:
            return torch.flatten(F.max_pool2d(F.relu(z), 2), 1)
        return F.relu(z) if k < 4 else z

    def head_features(self, k: int, a: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(a, self.head_pool), 1) if k == 0 else a

    def logits(self, k: int, a: torch.Tensor) -> torch.Tensor:
        return a if k == 4 else self.heads[k](self.head_features(k, a))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = self.activation(k, layer(x))
        return x


def local_step(net: LocalLeNet, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    """Set .grad of every layer and head from forward differences of the local losses (no autograd)."""
    n, h = x.shape[0], x
    for k, layer in enumerate(net.layers):
        z = layer(h)
        a = net.activation(k, z)
        logits = net.logits(k, a)
        loss = F.cross_entropy(logits, y, reduction="none")  # per example
        u = torch.randn_like(z)
        if k < 4:
            u = u * (z > 0)  # a unit the ReLU switched off has no effect on the loss: do not spend noise on it
        perturbed = F.cross_entropy(net.logits(k, net.activation(k, z + eps * u)), y, reduction="none")
        g = ((perturbed - loss) / eps).view(-1, *[1] * (z.dim() - 1)) * u / n  # d(mean loss)/dz, estimated
        if isinstance(layer, nn.Conv2d):
            layer.weight.grad = torch.nn.grad.conv2d_weight(h, layer.weight.shape, g)
            layer.bias.grad = g.sum((0, 2, 3))
        else:
            layer.weight.grad, layer.bias.grad = g.T @ h, g.sum(0)
        if k < 4:  # the head, from a perturbation of its logits
            v = torch.randn_like(logits)
            dv = (F.cross_entropy(logits + eps * v, y, reduction="none") - loss) / eps
            gl = dv[:, None] * v / n
            net.heads[k].weight.grad, net.heads[k].bias.grad = gl.T @ net.head_features(k, a), gl.sum(0)
        h = a


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seconds", type=float, default=200.0, help="training time budget")
    parser.add_argument("--steps", type=int, help="stop after this many steps instead, lr on a cosine schedule")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-every", type=float, default=20.0, help="training seconds between evaluations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)  # forward passes only: autograd is off for the whole run
    torch.manual_seed(args.seed)
    data = load_cifar10(args.data)
    mean, std = data.channel_stats()
    train = DeviceLoader(data.train_images, data.train_labels, mean, std, args.batch_size, "cpu", shuffle=True,
                         drop_last=True, order_seed=args.seed)
    test = DeviceLoader(data.test_images, data.test_labels, mean, std, 1000, "cpu")
    net = LocalLeNet()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    def test_accuracy() -> float:
        correct = sum((net.predict(x).argmax(1) == y).sum().item() for x, y in test.epoch(0))
        return correct / test.num_images

    def more() -> bool:
        return step < args.steps if args.steps else seconds < args.seconds

    curve, step, seconds = [], 0, 0.0
    while more():
        tick = time.perf_counter()
        until = seconds + args.eval_every if args.steps else min(args.seconds, seconds + args.eval_every)
        while seconds + (time.perf_counter() - tick) < until and (not args.steps or step < args.steps):
            if args.steps:
                for group in opt.param_groups:
                    group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            local_step(net, *train.batch(*divmod(step, len(train))), args.eps)
            opt.step()
            step += 1
        seconds += time.perf_counter() - tick
        curve.append(dict(step=step, forward_passes=2 * step, train_seconds=round(seconds, 1),
                          test_accuracy=test_accuracy()))
        print(curve[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("activity-prototype-cpu" + (f"-{args.steps}-steps" if args.steps else "") + ".json")
    out.write_text(json.dumps(dict(settings=vars(args), curve=curve), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
