"""Working a batch a few examples at a time: what keeps a forward-only step's memory near an inference
pass's (benchmarks/memory.py).  Per-example computations give the same results in chunks; the sums over
examples of a chunked product are added chunk by chunk (fixed order, so a step is still deterministic)."""

from __future__ import annotations

import torch
import torch.nn as nn

#: bytes of a batch that a working copy (a permuted read, a CPU weight-gradient operand) takes at a time
CHUNK_BYTES = 16 * 2**20


def example_slices(t: torch.Tensor, rows: slice = slice(None)) -> list[slice]:
    """``rows`` of ``t``'s batch (its first dimension) in the chunks a CPU works at a time, :data:`CHUNK_BYTES`
    of ``t`` each, so copies and temporaries stay small beside the batch; a GPU takes them at once (one
    launch each, the batch's parallelism)."""
    start, stop, _ = rows.indices(t.shape[0])
    if t.device.type != "cpu" or stop <= start:
        return [slice(start, stop)]
    step = max(1, CHUNK_BYTES // max(1, t[0].numel() * t.element_size()))
    return [slice(i, min(i + step, stop)) for i in range(start, stop, step)]


def set_weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """Set ``layer``'s gradients from the estimated gradient ``g`` of its output and its input ``x``:
    the layer's own weight-gradient product (a forward-type product, no autograd graph)."""
    if isinstance(layer, nn.Conv2d):
        # on CPU the product copies both operands (oneDNN's layouts): summed over chunks of examples, the
        # copies stay small
        weight = None
        for rows in example_slices(x):
            part = torch.nn.grad.conv2d_weight(
                x[rows], layer.weight.shape, g[rows], layer.stride, layer.padding, layer.dilation, layer.groups
            )
            weight = part if weight is None else weight.add_(part)
        layer.weight.grad = weight
        if layer.bias is not None:
            layer.bias.grad = g.sum((0, 2, 3))
    else:
        layer.weight.grad = g.T @ x
        if layer.bias is not None:
            layer.bias.grad = g.sum(0)
