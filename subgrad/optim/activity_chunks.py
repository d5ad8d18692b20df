"""Working a batch a few examples at a time: what keeps a forward-only step's memory near an inference
pass's (benchmarks/memory.py).  Per-example computations give the same results in chunks; the sums over
examples of a chunked product are added chunk by chunk (fixed order, so a step is still deterministic)."""

from __future__ import annotations

import torch
import torch.nn as nn

#: bytes of a batch that a working copy (a permuted read, a CPU weight-gradient operand) takes at a time
CHUNK_BYTES = 16 * 2**20


def example_chunk(t: torch.Tensor) -> int:
    """Examples of ``t`` (batch first) per chunk of :data:`CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // max(1, t[0].numel() * t.element_size())) if t.shape[0] else 1


def row_chunks(rows: slice, z: torch.Tensor) -> list[slice]:
    """``rows`` of ``z``'s batch in the chunks a perturbed pass takes at a time: on CPU a few MiB of ``z``
    each, so a tail's activations stay small beside the clean pass's; a GPU takes them at once."""
    start, stop, _ = rows.indices(z.shape[0])
    step = example_chunk(z) if z.device.type == "cpu" else max(1, stop - start)
    return [slice(i, min(i + step, stop)) for i in range(start, stop, step)] or [rows]


def set_weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """Set ``layer``'s gradients from the estimated gradient ``g`` of its output and its input ``x``:
    the layer's own weight-gradient product (a forward-type product, no autograd graph)."""
    if isinstance(layer, nn.Conv2d):
        # on CPU the product copies both operands (oneDNN's layouts): summed over chunks of examples, the
        # copies stay small; a GPU takes the batch at once
        step = example_chunk(x) if x.device.type == "cpu" else max(1, x.shape[0])
        weight = None
        for i in range(0, x.shape[0], step):
            part = torch.nn.grad.conv2d_weight(
                x[i : i + step], layer.weight.shape, g[i : i + step], layer.stride, layer.padding, layer.dilation,
                layer.groups,
            )  # fmt: skip
            weight = part if weight is None else weight.add_(part)
        layer.weight.grad = weight
        if layer.bias is not None:
            layer.bias.grad = g.sum((0, 2, 3))
    else:
        layer.weight.grad = g.T @ x
        if layer.bias is not None:
            layer.bias.grad = g.sum(0)
