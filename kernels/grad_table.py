"""Gradients read where they are: a table of their addresses, so one launch updates a whole flat buffer.

torch.optim's default ``zero_grad(set_to_none=True)`` makes backward allocate a fresh ``p.grad`` per
parameter every step.  Rather than copying them into one flat gradient buffer first (a second pass and a
second launch), the fused update kernels take a :class:`GradTable` in place of the flat gradient:

* a *tile table* (static, uploaded once): one row per program, ``(parameter, flat start, parameter's flat
  offset, parameter's flat end)``; a program never spans two parameters, so its gradient is one pointer;
* an *address table* (one int64 per parameter): ``p.grad.data_ptr()``, uploaded again only when an
  address changed (the caching allocator usually hands back the same blocks step after step).

The kernel turns each address into a pointer of the parameter's dtype (:func:`table_tile`).  The twins
read the same gradients by gathering them into a flat scratch buffer (one ``_foreach_copy_``), which on
a CPU is cheaper than a per-parameter loop.  The table may cover a subset of the buffer's parameters
(those with a gradient); the rest of the buffer is left alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TILE_SIZE

#: int64 values per tile row: parameter index, flat start, parameter's flat offset, parameter's flat end
TILE_ROW = 4


@triton.jit
def table_tile(tiles_ptr, addresses_ptr, param_ptr, TILE_SIZE: tl.constexpr):
    """This program's tile: its flat positions, their mask, and the gradient pointer of each position.

    ``tiles_ptr``: *int64 [tiles, 4] rows (parameter index, flat start, the parameter's flat offset, its
    flat end); ``addresses_ptr``: *int64 [parameters], each gradient's address; ``param_ptr``: the flat
    parameter buffer, whose element type the gradients share (torch requires ``p.grad.dtype == p.dtype``).
    """
    row = tiles_ptr + tl.program_id(0).to(tl.int64) * 4
    index = tl.load(row)
    start = tl.load(row + 1)
    first = tl.load(row + 2)
    end = tl.load(row + 3)
    pos = start + tl.arange(0, TILE_SIZE)
    mask = pos < end
    grad_base = tl.load(addresses_ptr + index).to(tl.pointer_type(param_ptr.dtype.element_ty))
    return pos, mask, grad_base + (pos - first)


@triton.jit
def tile_positions(tiles_ptr, grad_ptr, param_ptr, n, GRAD_TABLE: tl.constexpr, TILE_SIZE: tl.constexpr):
    """This program's flat positions, their mask and its gradient pointers: through the tables when
    ``GRAD_TABLE`` (:func:`table_tile`), else the ``TILE_SIZE`` slice of a flat ``grad_ptr`` of ``n``."""
    if GRAD_TABLE:
        pos, mask, grad_at = table_tile(tiles_ptr, grad_ptr, param_ptr, TILE_SIZE)
    else:
        pos = tl.program_id(0).to(tl.int64) * TILE_SIZE + tl.arange(0, TILE_SIZE)
        mask = pos < n
        grad_at = grad_ptr + pos
    return pos, mask, grad_at


class GradTable:
    """The gradients of some parameters of one flat buffer, for one fused update launch.

    Args:
        offsets: flat offset of each covered parameter, in increasing order.
        shapes: the shape of each gradient as it is stored (a complex one as its real view).
        like: the flat parameter buffer (device, dtype and length of the twins' scratch buffer).
    """

    def __init__(self, offsets: list[int], shapes: list[tuple[int, ...]], like: torch.Tensor):
        self.offsets, self.shapes, self.like = list(offsets), list(shapes), like
        self.sizes = [int(torch.Size(shape).numel()) for shape in shapes]
        self.numel = sum(self.sizes)
        self._scratch: torch.Tensor | None = None
        self._targets: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self._tiles: dict[int, torch.Tensor] = {}  # tile size -> device tile table
        self._addresses: torch.Tensor | None = None  # device address table, or None: upload at next use
        self._uploaded: list[int] | None = None
        self._ptrs: list[int] | None = None  # this step's addresses, when given with the gradients
        #: contiguous runs of covered parameters: (flat start, flat stop, first index, stop index)
        self.spans: list[tuple[int, int, int, int]] = []
        for i, (off, size) in enumerate(zip(self.offsets, self.sizes)):
            if self.spans and self.spans[-1][1] == off:
                start, _, first, _ = self.spans[-1]
                self.spans[-1] = (start, off + size, first, i + 1)
            else:
                self.spans.append((off, off + size, i, i + 1))

    @property
    def device(self) -> torch.device:
        return self.like.device

    @property
    def scratch(self) -> torch.Tensor:
        """A flat buffer like the parameters' that the twins gather the gradients into (made on first use:
        the kernel never needs it)."""
        if self._scratch is None:
            self._scratch = torch.empty_like(self.like)
            self._targets = [
                self._scratch[off : off + size].view(shape)
                for off, size, shape in zip(self.offsets, self.sizes, self.shapes)
            ]
        return self._scratch

    def set_grads(self, grads: list[torch.Tensor], ptrs: list[int] | None = None) -> None:
        """This step's gradients (contiguous, the parameters' dtype and device: checked by the caller),
        and their addresses when the caller has read them already."""
        self.grads, self._ptrs = grads, ptrs

    def tiles(self, tile_size: int = TILE_SIZE) -> torch.Tensor:
        """The device tile table for programs of ``tile_size`` elements (built once per size)."""
        table = self._tiles.get(tile_size)
        if table is None:
            rows = [
                (i, off + start, off, off + size)
                for i, (off, size) in enumerate(zip(self.offsets, self.sizes))
                for start in range(0, size, tile_size)
            ]
            table = torch.tensor(rows or [(0, 0, 0, 0)], dtype=torch.int64).reshape(-1, 4)[: len(rows)]
            table = self._tiles[tile_size] = table.to(self.device)
        return table

    def moved(self) -> bool:
        """Whether a gradient is not where the uploaded table says (the next :meth:`addresses` copies)."""
        return self._current() != self._uploaded

    def _current(self) -> list[int]:
        return self._ptrs if self._ptrs is not None else [g.data_ptr() for g in self.grads]

    def addresses(self) -> torch.Tensor:
        """The device address table of the current gradients: one host-to-device copy when an address
        changed since the last upload, none otherwise."""
        ptrs = self._current()
        if ptrs != self._uploaded:
            host = torch.tensor(ptrs, dtype=torch.int64)
            if self._addresses is None or self._addresses.numel() != len(ptrs):
                self._addresses = torch.empty(len(ptrs), dtype=torch.int64, device=self.device)
            if self.device.type == "cuda":
                host = host.pin_memory()  # an asynchronous copy; the allocator keeps it until the copy ran
            self._addresses.copy_(host, non_blocking=True)
            self._uploaded = ptrs
        return self._addresses

    def gather(self) -> list[tuple[int, int]]:
        """Copy the gradients into ``scratch`` (one multi-tensor copy); returns the flat spans they fill."""
        self.scratch  # noqa: B018 (makes the targets)
        torch._foreach_copy_(self._targets, self.grads)
        return [(start, stop) for start, stop, _, _ in self.spans]


def twin_views(grad: torch.Tensor | GradTable) -> list[tuple[slice, torch.Tensor]]:
    """What a twin updates: the whole buffer with its flat gradient, or each span a table covers with
    its gradients gathered into the table's scratch buffer."""
    if not isinstance(grad, GradTable):
        return [(slice(None), grad)]
    return [(slice(a, b), grad.scratch[a:b]) for a, b in grad.gather()]
