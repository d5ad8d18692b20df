"""Models cut into locally trained blocks, for forward-only training by activity perturbation
(:class:`subgrad.optim.ActivityZO`, ``subgrad train --optimizer zo``).

A *block* maps its input ``h`` to its output ``a``; the next block starts from ``a``, so no training
signal crosses blocks.  Each block owns one or more *sites*: the output ``z = layer(x)`` of a
convolution or linear layer, where the optimizer perturbs activities.  For each site a block can rerun
its *tail*, the rest of the block from a changed ``z`` (``x`` and everything before stay as they were),
for any contiguous rows of the batch: a tail treats every example on its own (BatchNorm in a tail uses the
clean pass's batch statistics), so data-parallel ranks can each run their share of the rows.
A block's loss is cross-entropy of its *head*: a training-only linear classifier on its (average-pooled)
output, or the model's own output for the last block.  Heads live in the optimizer, never in the model,
so a trained model exports exactly as it would from backprop.

Cuts (the models of :mod:`subgrad.models`, unchanged):

* ``lenet``: five blocks, one site each: conv1 -> ReLU -> pool, conv2 -> ReLU -> pool -> flatten,
  fc1 -> ReLU, fc2 -> ReLU, fc3 (the classifier).
* ``resnet20``: the stem (conv, BN, ReLU), each of the 9 basic blocks (sites conv1 and conv2; the tail of
  conv1 runs through conv2), and the pooled classifier fc.  BatchNorm scale and shift are not trained by
  this method (they stay at 1 and 0; see :func:`untrained_parameters`); the tails normalise with the clean
  pass's batch statistics, held fixed, and never touch the running statistics, which the clean pass
  updates once per step.

Everything here is forward computation; nothing needs autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import BasicBlock, LeNet, ResNet20


@dataclass
class SiteRecord:
    """What the clean pass leaves for one site: the layer, its input and output, and which output units
    can change the loss (``active``: False where a ReLU right after switches the unit off, or a max-pool
    takes another unit of its window; such a unit's true gradient is 0, so perturbing it would only add
    noise to the layer's gradient estimate)."""

    layer: nn.Conv2d | nn.Linear
    x: torch.Tensor
    z: torch.Tensor
    active: torch.Tensor | None  # bool like z, or None: every unit counts


@dataclass
class BlockPass:
    """A block's clean pass: its output, its sites, and ``tail(j, z, rows)``: rows ``rows`` (a slice of the
    batch) of the output with site j's output replaced by ``z`` (which holds those rows only).  A tail is
    per example: ``tail(j, z[rows], rows) == tail(j, z, ALL)[rows]``."""

    out: torch.Tensor
    sites: list[SiteRecord]
    tail: Callable[[int, torch.Tensor, slice], torch.Tensor]


#: every row of the batch
ALL = slice(None)


def _upsample2(m: torch.Tensor) -> torch.Tensor:
    """Each value of a 2x2-pooled map repeated over its window (the window's maximum, at every position)."""
    return m.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _pooled(out: torch.Tensor, pool: int) -> torch.Tensor:
    """Head features of a convolutional block: its output average-pooled to pool x pool, flattened."""
    return torch.flatten(F.adaptive_avg_pool2d(out, pool), 1)


def _batch_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of a clean pass's batch: what training-mode BatchNorm uses."""
    var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    return mean, var


def _bn(bn: nn.BatchNorm2d, z: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """BatchNorm of a perturbed tail with the clean batch's statistics ``stats``, held fixed: each example's
    tail depends on that example alone (so ranks can split the rows), and running statistics are untouched."""
    return F.batch_norm(z, stats[0], stats[1], bn.weight, bn.bias, False, 0.0, bn.eps)


class LocalBlock(nn.Module):
    """One locally trained block; subclasses define the clean pass (:meth:`run`)."""

    def run(self, h: torch.Tensor) -> BlockPass:
        raise NotImplementedError

    def head_features(self, out: torch.Tensor) -> torch.Tensor | None:
        """Input of this block's head; None for the last block (its output is the model's logits)."""
        return None


class LeNetBlock(LocalBlock):
    """One layer of LeNet and what follows it up to the next layer."""

    def __init__(self, layer: nn.Module, kind: str, head_pool: int | None):
        super().__init__()
        self.layer, self.kind, self.head_pool = layer, kind, head_pool

    def after(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return F.max_pool2d(F.relu(z), 2)
        if self.kind == "conv-flatten":
            return torch.flatten(F.max_pool2d(F.relu(z), 2), 1)
        return F.relu(z) if self.kind == "relu" else z

    def run(self, h):
        z = self.layer(h)
        active = None
        if self.kind in ("conv", "conv-flatten"):  # ReLU then 2x2 max-pool: only a window's positive maximum
            active = (z > 0) & (z == _upsample2(F.max_pool2d(z, 2)))  # moves the output
        elif self.kind == "relu":
            active = z > 0
        return BlockPass(self.after(z), [SiteRecord(self.layer, h, z, active)], lambda j, zp, rows: self.after(zp))

    def head_features(self, out):
        if self.kind == "logits":
            return None
        return _pooled(out, self.head_pool) if self.head_pool and out.dim() == 4 else torch.flatten(out, 1)


class StemBlock(LocalBlock):
    """ResNet-20's first conv, BN, ReLU."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, head_pool: int):
        super().__init__()
        self.conv, self.bn, self.head_pool = conv, bn, head_pool

    def run(self, h):
        z = self.conv(h)
        out = F.relu(self.bn(z))  # the module: updates the running statistics, once per step
        stats = _batch_stats(z)
        return BlockPass(
            out, [SiteRecord(self.conv, h, z, out > 0)], lambda j, zp, rows: F.relu(_bn(self.bn, zp, stats))
        )

    def head_features(self, out):
        return _pooled(out, self.head_pool)


class ResidualBlock(LocalBlock):
    """One basic block of ResNet-20: sites conv1 and conv2."""

    def __init__(self, block: BasicBlock, head_pool: int):
        super().__init__()
        self.block, self.head_pool = block, head_pool

    def run(self, h):
        b = self.block
        z1 = b.conv1(h)
        x2 = F.relu(b.bn1(z1))
        z2 = b.conv2(x2)
        short = b.shortcut(h)
        out = F.relu(b.bn2(z2) + short)
        stats1, stats2 = _batch_stats(z1), _batch_stats(z2)

        def tail(j, zp, rows):
            if j == 0:
                zp = b.conv2(F.relu(_bn(b.bn1, zp, stats1)))
            return F.relu(_bn(b.bn2, zp, stats2) + short[rows])

        return BlockPass(out, [SiteRecord(b.conv1, h, z1, x2 > 0), SiteRecord(b.conv2, x2, z2, out > 0)], tail)

    def head_features(self, out):
        return _pooled(out, self.head_pool)


class ClassifierBlock(LocalBlock):
    """ResNet-20's global average pool and fc: its loss is the model's own."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def run(self, h):
        x = F.adaptive_avg_pool2d(h, 1).flatten(1)
        z = self.fc(x)
        return BlockPass(z, [SiteRecord(self.fc, x, z, None)], lambda j, zp, rows: zp)


def local_blocks(model: nn.Module, head_pool: int = 4) -> list[LocalBlock]:
    """The model cut into blocks (they share the model's layers; nothing is copied)."""
    if isinstance(model, LeNet):
        return [
            LeNetBlock(model.conv1, "conv", head_pool),
            LeNetBlock(model.conv2, "conv-flatten", None),
            LeNetBlock(model.fc1, "relu", None),
            LeNetBlock(model.fc2, "relu", None),
            LeNetBlock(model.fc3, "logits", None),
        ]
    if isinstance(model, ResNet20):
        return (
            [StemBlock(model.conv, model.bn, head_pool)]
            + [ResidualBlock(b, head_pool) for b in model.layers]
            + [ClassifierBlock(model.fc)]
        )
    raise ValueError(
        f"activity perturbation needs a block cut of the model, and there is one for LeNet and "
        f"ResNet20 only (got {type(model).__name__}); add one in subgrad/local.py or use zo-adam"
    )


def make_heads(blocks: list[LocalBlock], example: torch.Tensor) -> nn.ModuleList:
    """One training-only linear head per block but the last, from the block's head features to the
    model's classes, sized by a clean pass of ``example`` (a small batch of inputs; the model's running
    statistics are restored afterwards)."""
    bns = [m for b in blocks for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    widths, h = [], example
    with torch.no_grad():
        for block in blocks:
            h = block.run(h).out
            features = block.head_features(h)
            if features is not None:
                widths.append(features.shape[1])
    for m, state in zip(bns, saved):
        m.load_state_dict(state)
    return nn.ModuleList(nn.Linear(w, h.shape[1], device=example.device) for w in widths)


def trained_parameters(blocks: list[LocalBlock]) -> list[nn.Parameter]:
    """The parameters the sites train: every convolution's and linear layer's, in block order."""
    return [
        p
        for b in blocks
        for m in b.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        for p in m.parameters(recurse=False)
    ]


def untrained_parameters(model: nn.Module, blocks: list[LocalBlock]) -> list[str]:
    """Names of the model's parameters no site trains (BatchNorm scale and shift)."""
    trained = {id(p) for p in trained_parameters(blocks)}
    return [name for name, p in model.named_parameters() if id(p) not in trained]
