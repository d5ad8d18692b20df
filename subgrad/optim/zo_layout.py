"""How an optimizer sees its parameters: flat segments and estimation blocks.

A *segment* is one contiguous buffer (one param group x device x dtype, from :class:`FlatParams`).
All segments together index one *direction space* of ``total`` elements: segment ``s`` covers
``[s.dir_offset, s.dir_offset + s.numel)``, so one seed names one direction over every parameter.

A *block* is a set of parameters that gets its own finite-difference scalar.  Blocks are described
as ranges of the direction space; each segment gets the pieces that fall inside it (``pieces``), plus
the tables the fused update kernel reads (``block_starts`` and the global ``block_ids`` of its pieces).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..flat import FlatGroup, FlatParams
from ..kernels import make_block_starts


@dataclass
class Segment:
    group_index: int  # index into optimizer.param_groups
    flat: FlatGroup
    dir_offset: int  # position of element 0 in the direction space
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (start, stop, block id), local
    block_starts: torch.Tensor | None = None  # int64 [pieces] on the device, None for a single piece
    block_ids: torch.Tensor | None = None  # int64 [pieces] global block id of each piece
    buffers: dict[str, torch.Tensor | None] = field(default_factory=dict)  # optimizer state, flat fp32
    every_block: bool = False  # its pieces are blocks 0, 1, ..., num_blocks - 1 in order (one segment)

    @property
    def master(self) -> torch.Tensor | None:
        """fp32 master copy of half-precision parameters (a state buffer, saved with the others)."""
        return self.buffers.get("master")

    @property
    def data(self) -> torch.Tensor:
        return self.flat.data

    @property
    def numel(self) -> int:
        return self.flat.numel


def build_segments(param_groups, master_weights: bool | None) -> tuple[list[FlatParams], list[Segment]]:
    """Pack each param group and lay the segments out one after another in direction space."""
    flats, segments, offset = [], [], 0
    for gi, group in enumerate(param_groups):
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        if any(p.is_complex() for p in params):
            raise ValueError(
                "zeroth-order optimizers support real parameters only (a direction is real); "
                "split a complex parameter into real and imaginary parts"
            )
        flat = FlatParams(params)
        flats.append(flat)
        for fg in flat.groups:
            if fg.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"zeroth-order optimizers support float32/bfloat16/float16 parameters, got {fg.dtype}")
            use_master = master_weights if master_weights is not None else fg.dtype != torch.float32
            buffers = {"master": fg.data.to(torch.float32).clone()} if use_master else {}
            segments.append(Segment(gi, fg, offset, buffers=buffers))
            offset += fg.numel
    if offset > 2**32:
        raise ValueError(f"{offset} parameters exceed the 2**32 elements one direction can index")
    return flats, segments


def param_ranges(segments: list[Segment]) -> list[tuple[int, int, torch.nn.Parameter]]:
    """(start, stop, param) in direction space, in order."""
    out = []
    for seg in segments:
        for p, off in zip(seg.flat.params, seg.flat.offsets):
            out.append((seg.dir_offset + off, seg.dir_offset + off + p.numel(), p))
    return out


def block_ranges(segments: list[Segment], blocks, names: dict[int, str]) -> tuple[list[tuple[int, int, int]], int]:
    """Direction-space ranges (start, stop, block id) tiling every parameter, and the block count.

    ``blocks``: None (one block), "tensor" (one per parameter tensor), "module" (one per owning module,
    from parameter names), or an int block size.
    """
    total = sum(s.numel for s in segments)
    if blocks is None:
        return [(0, total, 0)], 1
    if isinstance(blocks, int):
        return [(a, min(a + blocks, total), i) for i, a in enumerate(range(0, total, blocks))], -(-total // blocks)
    ranges, ids = [], {}
    for start, stop, p in param_ranges(segments):
        if stop == start:  # a parameter with no elements has nothing to estimate
            continue
        if blocks == "tensor":
            key = id(p)
        else:  # "module": everything before the last dot of the parameter's name
            key = names[id(p)].rpartition(".")[0]
        bid = ids.setdefault(key, len(ids))
        if ranges and ranges[-1][1] == start and ranges[-1][2] == bid:  # a module's weight and bias: one range,
            ranges[-1] = (ranges[-1][0], stop, bid)  # so each block is perturbed in one call, not one per tensor
        else:
            ranges.append((start, stop, bid))
    return ranges, len(ids)


def assign_blocks(segments: list[Segment], ranges: list[tuple[int, int, int]], num_blocks: int) -> None:
    """Give each segment its local pieces and the kernel's block tables."""
    for seg in segments:
        lo, hi = seg.dir_offset, seg.dir_offset + seg.numel
        seg.pieces = [(max(a, lo) - lo, min(b, hi) - lo, bid) for a, b, bid in ranges if a < hi and b > lo]
        seg.every_block = [bid for _, _, bid in seg.pieces] == list(range(num_blocks))
        device = seg.data.device
        seg.block_ids = torch.tensor([bid for _, _, bid in seg.pieces], dtype=torch.int64, device=device)
        seg.block_starts = make_block_starts([b - a for a, b, _ in seg.pieces], device) if len(seg.pieces) > 1 else None


@dataclass
class ZOLayout:
    """What zeroth-order estimation needs to know of the packed parameters: the segments (with their
    pieces of the estimation blocks), how many blocks there are, each parameter's name (None where the
    optimizer was given bare parameters) and each block's step scale ``(d + 2) / (d_b + 2)``."""

    segments: list[Segment]
    num_blocks: int
    names: dict[int, str | None]  # id(parameter) -> name
    block_scale: torch.Tensor  # float64 [num_blocks] on the parameters' device
    prepared: dict = field(default_factory=dict)  # launches prepared for this layout (zo_estimate.BlockMoves)

    def __getstate__(self) -> dict:
        # prepared launches bind this object's tensors (and cannot be pickled): a copy prepares its own
        return {**self.__dict__, "prepared": {}}

    @property
    def total(self) -> int:
        """Elements of the direction space (every trainable parameter)."""
        return sum(s.numel for s in self.segments)

    @property
    def device(self) -> torch.device:
        return self.segments[0].data.device
