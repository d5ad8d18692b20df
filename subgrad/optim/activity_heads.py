"""The training-only local losses of :class:`subgrad.optim.ActivityZO`: a head per block but the last
(:class:`LocalHead`), sized by a clean pass (:func:`make_heads`).  Heads live in the optimizer, never in the
model, so a trained model exports exactly as it would from backprop."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activity_blocks import LocalBlock
from .activity_chunks import example_slices


class LocalHead(nn.Module):
    """A block's training-only local losses: its output cut into *parts*, each classified on its own.

    A convolutional output ``(C, H, W)`` is cut into ``tiles x tiles`` patches (``tiles = min(patches, H, W)``,
    which must divide H and W) and its channels into ``groups`` groups; a vector output ``(C,)`` into channel
    groups only.  A part's features are its channels averaged over its patch to ``pool x pool`` bins (at most
    the patch's size), standardised over the part's features when ``norm`` (mean 0, variance 1: a LayerNorm
    without scale), and its logits come from its own linear map.  The block's loss is the mean over parts of
    their cross-entropies, so a unit of the output moves one part's loss only (:meth:`part_map`): a
    perturbation of it is measured on that part's loss alone, without the noise of the other parts' units.
    """

    def __init__(self, shape: tuple[int, ...], classes: int, patches: int, groups: int, pool: int, norm: bool):
        super().__init__()
        channels = shape[0]
        if channels % groups:
            raise ValueError(f"groups={groups} must divide the {channels} channels of a block output {tuple(shape)}")
        if len(shape) == 3:
            height, width = shape[1:]
            tiles = min(patches, height, width)
            if height % tiles or width % tiles:
                divisors = [k for k in range(1, min(height, width) + 1) if height % k == 0 and width % k == 0]
                raise ValueError(
                    f"patches={patches} does not cut a {height}x{width} block output evenly; use {divisors}"
                )
            self.bins = (min(pool, height // tiles), min(pool, width // tiles))
            # a patch's average pooling to its bins as one matrix (pixels x bins): a small matmul is several
            # times faster on CPU than adaptive pooling with overlapping windows
            th, tw = height // tiles, width // tiles
            basis = torch.eye(th * tw).view(th * tw, 1, th, tw)
            pool_matrix = F.adaptive_avg_pool2d(basis, self.bins).view(th * tw, -1)
            self.register_buffer("pool_matrix", pool_matrix, persistent=False)
        else:
            tiles, self.bins = 1, (1, 1)
        self.shape, self.tiles, self.groups, self.norm = tuple(shape), tiles, groups, norm
        parts, features = groups * tiles * tiles, channels // groups * self.bins[0] * self.bins[1]
        bound = features**-0.5  # nn.Linear's initialisation, per part
        self.weight = nn.Parameter(torch.empty(parts, features, classes).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(parts, 1, classes).uniform_(-bound, bound))

    @property
    def parts(self) -> int:
        return self.weight.shape[0]

    def features(self, out: torch.Tensor) -> torch.Tensor:
        """``(parts, n, features)``: each part's features for each example of the block output ``out``."""
        n, g, t = out.shape[0], self.groups, self.tiles
        if out.dim() == 2:
            f = out.view(n, g, -1).transpose(0, 1)
        else:
            c, h, w = self.shape
            tiled = out.view(n, g, c // g, t, h // t, t, w // t).permute(1, 3, 5, 0, 2, 4, 6)
            # a part's pixels are not contiguous, so reading them copies: on CPU a few examples at a time
            part_pixels = (self.parts, -1, c // g, (h // t) * (w // t))  # each copy freed once pooled
            pooled = [tiled[:, :, :, rows].reshape(part_pixels) @ self.pool_matrix for rows in example_slices(out)]
            f = torch.cat(pooled, dim=1).reshape(self.parts, n, -1)
        if self.norm and f.shape[-1] > 1:
            var, mean = torch.var_mean(f, dim=-1, unbiased=False, keepdim=True)
            f = (f - mean) * torch.rsqrt(var + 1e-5)
        return f

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(parts, n, classes)`` logits from :meth:`features`."""
        return torch.baddbmm(self.bias, features, self.weight)

    def set_grad(self, features: torch.Tensor, g: torch.Tensor) -> None:
        """Gradients of the weights from an estimate ``g`` (like the logits) of the loss's gradient w.r.t. them."""
        self.weight.grad = torch.bmm(features.transpose(1, 2), g)
        self.bias.grad = g.sum(1, keepdim=True)

    def part_map(self) -> torch.Tensor:
        """The part each unit of one example's output belongs to (int64, shaped like the output)."""
        c = self.shape[0]
        group = torch.arange(c).div(c // self.groups, rounding_mode="floor") * self.tiles**2
        if len(self.shape) == 1:
            return group
        h, w = self.shape[1:]
        t = self.tiles
        rows = torch.arange(h).div(h // t, rounding_mode="floor")
        cols = torch.arange(w).div(w // t, rounding_mode="floor")
        return group[:, None, None] + (rows[:, None] * t + cols[None, :])[None]


def make_heads(
    blocks: list[LocalBlock],
    example: torch.Tensor,
    *,
    patches: int = 1,
    groups: int = 1,
    pool: int = 4,
    norm: bool = False,
) -> nn.ModuleList:
    """One training-only :class:`LocalHead` per block but the last, to the model's classes, sized by a clean
    pass of ``example`` (a small batch of inputs) in eval mode: running statistics untouched, and a batch of
    one is fine."""
    modes = {m: m.training for b in blocks for m in b.modules()}
    shapes, h = [], example
    try:
        with torch.no_grad():
            for block in blocks:
                h = block.eval().run(h).out
                head_input = block.head_input(h)
                assert (head_input is None) == (block is blocks[-1]), "every block but the last has a head"
                if head_input is not None:
                    shapes.append(head_input.shape[1:])
    finally:
        for m, training in modes.items():
            m.training = training
    if h.dim() != 2:
        raise ValueError(f"the model's output must be logits (batch, classes) for its loss; got {tuple(h.shape)}")
    return nn.ModuleList(LocalHead(s, h.shape[1], patches, groups, pool, norm).to(example.device) for s in shapes)
