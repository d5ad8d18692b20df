"""The block cut that :class:`subgrad.optim.ActivityZO` (``subgrad train --optimizer zo``) trains: the
protocol a model implements (:class:`BlockCut`) and the blocks it is made of.

A *block* maps its input ``h`` to its output ``a``; the next block starts from ``a``, so no training
signal crosses blocks.  Each block owns one or more *sites*: the activity ``z`` of a convolution or
linear layer (its output ``layer(x)``, or that output after ReLU and 2x2 max-pooling, see
:class:`SiteRecord`), where the optimizer perturbs.  For each site a block can rerun its *tail*, the rest
of the block from a changed ``z`` (``x`` and everything before stay as they were), for any contiguous rows
of the batch: a tail treats every example on its own (BatchNorm in a tail uses the clean pass's batch
statistics), so data-parallel ranks can each run their share of the rows.  A block's loss comes from its
*head* (:class:`.activity_heads.LocalHead`): training-only linear classifiers on parts of its output (one
part, the average-pooled output, by default), or the model's own output for the last block.  Heads live in the
optimizer, never in the model, so a trained model exports exactly as it would from backprop.

A model provides its cut by implementing :class:`BlockCut`: a method ``local_blocks()`` returning its
blocks in forward order, built from the classes here (:class:`PlainBlock`, :class:`StemBlock`,
:class:`ResidualBlock`, :class:`ClassifierBlock`) or the user's own :class:`LocalBlock` subclasses.  The
built-in models' cuts live beside them in :mod:`subgrad.models`.  BatchNorm in a residual block: its scale
and shift are not trained by this method (they stay at 1 and 0; see :func:`untrained_parameters`); the
tails normalise with the clean pass's batch statistics, held fixed (so each example's tail is its own), and
never touch the running statistics, which the clean pass updates once per step.  A site's estimate is then
carried through its own BatchNorm's statistics in closed form (:func:`through_batch_stats`); conv1's path
through bn2's statistics stays held fixed.

Everything here is forward computation; nothing needs autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activity_chunks import example_slices


@dataclass
class SiteRecord:
    """What the clean pass leaves for one site: the layer, its input ``x``, the activity ``z`` the optimizer
    perturbs, and which units of it can change the loss (``active``: False where a ReLU switches the unit
    off; such a unit's true gradient is 0, so perturbing it would only add noise to the estimate).

    ``z`` is the layer's output, or for a convolution followed by ReLU and 2x2 max-pooling the pooled
    output: each pooled unit is one unit of the layer's output (its window's maximum) with local derivative
    1, so perturbing it is perturbing that unit, at a quarter of the draws and without rerunning the pool.
    ``unpool`` then carries an estimated gradient of ``z`` back to the layer's output (to its windows'
    maxima; 0 elsewhere).

    ``x`` may be a function that recomputes the input when the optimizer needs it (after the perturbed
    passes), so a block need not hold it through them.

    ``through_stats`` (a site that training-mode BatchNorm normalises) turns an estimated gradient of ``z``
    with the batch statistics held fixed, which is what the tails measure, into the gradient through them,
    which is what the model's loss has (:func:`through_batch_stats`)."""

    layer: nn.Conv2d | nn.Linear
    x: torch.Tensor | Callable[[], torch.Tensor]  # or a function recomputing it bit for bit: not held
    z: torch.Tensor
    active: torch.Tensor | None  # bool like z, or None: every unit counts
    unpool: Callable[[torch.Tensor], torch.Tensor] | None = None
    through_stats: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class BlockPass:
    """A block's clean pass: its output, its sites, and ``tail(j, z, rows)``: rows ``rows`` (a slice of the
    batch) of the output with site j's activity replaced by ``z`` (which holds those rows only; the tail owns
    it, and may overwrite or drop it).  A tail is per example: ``tail(j, z[rows], rows) == tail(j, z,
    ALL)[rows]``."""

    out: torch.Tensor
    sites: list[SiteRecord]
    tail: Callable[[int, torch.Tensor, slice], torch.Tensor]


#: every row of the batch
ALL = slice(None)


def _channel_dims(z: torch.Tensor) -> tuple[int, ...]:
    """The dimensions BatchNorm reduces over: the batch and the positions, (batch, channels[, positions])."""
    return (0, *range(2, z.dim()))


def batch_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of a clean pass's batch: what training-mode BatchNorm uses."""
    var, mean = torch.var_mean(z, dim=_channel_dims(z), unbiased=False)
    return mean, var


def through_batch_stats(
    bn: nn.BatchNorm2d, z: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """For a site ``z`` that ``bn`` normalises with the clean batch's statistics ``stats``: the map from a
    gradient ``g`` of the loss w.r.t. ``z`` with the statistics held fixed to the gradient through them
    (written over ``g``: the estimate is the caller's to give up).

    Training-mode BatchNorm's mean and variance are functions of the whole batch, so the loss's gradient is
    (BatchNorm's backward, per channel c, means over examples and positions, zhat = (z - mean) / std)::

        g_true = g - mean_c(g) - zhat * mean_c(g * zhat)

    Without it the estimate has a part no number of directions removes: the fixed-statistics gradient moves
    a channel's mean and scale, which the normalisation then undoes (benchmarks/zo_variance.py measures the
    difference).  Per-channel reductions over the batch, so every data-parallel rank applies it to the whole
    batch's estimate (which each holds)."""
    mean, var = stats
    rstd = torch.rsqrt(var + bn.eps)
    dims, per_channel = _channel_dims(z), (-1,) + (1,) * (z.dim() - 2)  # BatchNorm2d: (0, 2, 3), (-1, 1, 1)

    def correct(g: torch.Tensor) -> torch.Tensor:
        count = g.numel() // g.shape[1]
        g_mean = g.sum(dims) / count
        g_z = sum((g[rows] * z[rows]).sum(dims) for rows in example_slices(g))  # on CPU: no batch-sized product
        g_zhat = (g_z / count - mean * g_mean) * rstd  # mean_c(g * zhat)
        k = g_zhat * rstd  # g_true = g - k z - (g_mean - k mean): zhat's two terms in one pass over z
        return g.addcmul_(z, -k.view(per_channel)).sub_((g_mean - k * mean).view(per_channel))  # g is ours

    return correct


def _bn(bn: nn.BatchNorm2d, z: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """BatchNorm of a perturbed tail with the clean batch's statistics ``stats``, held fixed: each example's
    tail depends on that example alone (so ranks can split the rows), and running statistics are untouched."""
    return F.batch_norm(z, stats[0], stats[1], bn.weight, bn.bias, False, 0.0, bn.eps)


class LocalBlock(nn.Module):
    """One locally trained block; subclasses define the clean pass (:meth:`run`).  Every block of a cut but
    the last has a head; the last block's output is the model's logits."""

    num_sites = 1

    def run(self, h: torch.Tensor) -> BlockPass:
        raise NotImplementedError

    def head_input(self, out: torch.Tensor) -> torch.Tensor | None:
        """The block output as its head reads it (a feature map or a vector per example); None for the last
        block (its output is the model's logits)."""
        return out

    def site_parts(self, j: int, parts: torch.Tensor) -> torch.Tensor | None:
        """The head part each unit of site j's output moves (shaped like one example's ``z``), given the part
        of each unit of the head input (:meth:`.activity_heads.LocalHead.part_map`); None when the site's tail
        mixes units of several parts, so its perturbations are measured on the block's whole loss."""
        return None


class PlainBlock(LocalBlock):
    """One layer of a plain (non-residual) net and what follows it up to the next layer: ``kind`` "conv"
    (ReLU, 2x2 max-pool), "conv-flatten" (the same, then flatten), "relu", or "logits" (nothing)."""

    def __init__(self, layer: nn.Module, kind: str):
        super().__init__()
        self.layer, self.kind = layer, kind

    def run(self, h):
        z = self.layer(h)
        if self.kind == "logits":
            return BlockPass(z, [SiteRecord(self.layer, h, z, None)], lambda j, zp, rows: zp)
        if self.kind == "relu":
            return BlockPass(F.relu(z), [SiteRecord(self.layer, h, z, z > 0)], lambda j, zp, rows: F.relu(zp))
        # ReLU then 2x2 max-pool: the site is the pooled output, where a window's positive maximum moves it
        pooled, where = F.max_pool2d(F.relu(z), 2, return_indices=True)
        size = z.shape[-2:]
        site = SiteRecord(self.layer, h, pooled, pooled > 0, lambda g: F.max_unpool2d(g, where, 2, output_size=size))
        if self.kind == "conv":
            return BlockPass(pooled, [site], lambda j, zp, rows: zp)
        return BlockPass(torch.flatten(pooled, 1), [site], lambda j, zp, rows: torch.flatten(zp, 1))

    def head_input(self, out):
        if self.kind == "logits":
            return None
        if self.kind == "conv-flatten":  # the pooled map before flattening
            side = int(round((out.shape[1] // self.layer.out_channels) ** 0.5))
            return out.view(out.shape[0], self.layer.out_channels, side, side)
        return out

    def site_parts(self, j, parts):
        return parts  # the site is the block's output (conv-flatten: before flattening)


class StemBlock(LocalBlock):
    """ResNet-20's first conv, BN, ReLU."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def run(self, h):
        z = self.conv(h)
        out = F.relu_(self.bn(z))  # the module: updates the running statistics, once per step
        stats = batch_stats(z)
        return BlockPass(
            out,
            [SiteRecord(self.conv, h, z, out > 0, through_stats=through_batch_stats(self.bn, z, stats))],
            lambda j, zp, rows: F.relu_(_bn(self.bn, zp, stats)),
        )

    def site_parts(self, j, parts):
        return parts  # BatchNorm with fixed statistics and ReLU act per unit


class ResidualBlock(LocalBlock):
    """One basic residual block, ``relu(bn2(conv2(relu(bn1(conv1(h))))) + block.shortcut(h))`` (ResNet-20's
    ``BasicBlock``, or any module with those five attributes): sites conv1 and conv2."""

    num_sites = 2

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def run(self, h):
        b = self.block
        z1 = b.conv1(h)
        x2 = F.relu_(b.bn1(z1))  # in place on fresh outputs (no autograd here): fewer live activations
        z2 = b.conv2(x2)
        short = b.shortcut(h)
        out = F.relu_(b.bn2(z2).add_(short))
        stats1, stats2 = batch_stats(z1), batch_stats(z2)

        def tail(j, zp, rows):
            if j == 0:
                x2p = F.relu_(_bn(b.bn1, zp, stats1))
                del zp  # the tail owns its input: each activation is freed once read
                zp = b.conv2(x2p)
                del x2p
            return F.relu_(_bn(b.bn2, zp, stats2).add_(short[rows]))

        def conv2_input():  # the clean x2 again (training-mode BatchNorm of z1 computes the same statistics)
            return F.relu_(F.batch_norm(z1, None, None, b.bn1.weight, b.bn1.bias, True, 0.0, b.bn1.eps))

        sites = [
            SiteRecord(b.conv1, h, z1, x2 > 0, through_stats=through_batch_stats(b.bn1, z1, stats1)),
            SiteRecord(b.conv2, conv2_input, z2, out > 0, through_stats=through_batch_stats(b.bn2, z2, stats2)),
        ]
        return BlockPass(out, sites, tail)

    def site_parts(self, j, parts):
        return parts if j == 1 else None  # conv1's tail runs through conv2, which mixes neighbouring units


class ClassifierBlock(LocalBlock):
    """ResNet-20's global average pool and fc: its loss is the model's own."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def run(self, h):
        x = F.adaptive_avg_pool2d(h, 1).flatten(1)
        z = self.fc(x)
        return BlockPass(z, [SiteRecord(self.fc, x, z, None)], lambda j, zp, rows: zp)

    def head_input(self, out):
        return None


@runtime_checkable
class BlockCut(Protocol):
    """What a model provides to be trained by activity perturbation: its forward pass as blocks."""

    def local_blocks(self) -> list[LocalBlock]:
        """The blocks in forward order; they share the model's layers (nothing is copied), every block's
        output is the next block's input, and the last block's output is the model's logits."""
        ...


def local_blocks(model: nn.Module) -> list[LocalBlock]:
    """The model's block cut (:class:`BlockCut`), checked."""
    if not isinstance(model, BlockCut):
        raise ValueError(
            f"activity perturbation needs the model's block cut and {type(model).__name__} has none; give it a "
            "local_blocks() method (subgrad.optim.activity_blocks.BlockCut) or use zo-adam"
        )
    blocks = list(model.local_blocks())
    if not blocks or not all(isinstance(b, LocalBlock) for b in blocks):
        raise ValueError(
            f"{type(model).__name__}.local_blocks() must return a non-empty list of "
            "subgrad.optim.activity_blocks.LocalBlock"
        )
    return blocks


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
