"""FlatParams: all trainable parameters of one device and dtype in one contiguous buffer.

Each parameter's ``.data`` becomes a view into its group's buffer (the ``Parameter`` objects, and so
``module.state_dict()``, ``load_state_dict()`` and any optimizer holding them, are unchanged), so a
kernel pass over a whole model is one launch per group, usually one.  Gradients get the same
treatment: ``p.grad`` is a view into a flat gradient buffer, which autograd accumulates into in place.

Moving the module afterwards (``.to()``, ``.cuda()``, ``.half()``) replaces each ``p.data`` with a new
tensor and silently breaks the aliasing.  Every accessor checks for that and raises a one-line error
naming the fix (:meth:`FlatParams.repack`), rather than updating a stale buffer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


class StaleFlatParamsError(RuntimeError):
    """The module's parameters no longer live in the flat buffers (it was moved or re-assigned)."""


# A complex parameter lives in a real buffer as its real view (torch.view_as_real: re, im interleaved),
# which is also what torch.optim steps; these helpers are the one place that knows it.
def storage_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of the flat buffer that holds ``p``: its real dtype for a complex parameter."""
    return p.real.dtype if p.is_complex() else p.dtype


def storage_numel(p: torch.Tensor) -> int:
    """Elements ``p`` takes in its flat buffer (two per complex element)."""
    return p.numel() * (2 if p.is_complex() else 1)


def as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def shaped_like(flat_slice: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``flat_slice`` (``storage_numel(p)`` elements) viewed with ``p``'s shape and dtype."""
    if p.is_complex():
        return torch.view_as_complex(flat_slice.view(*p.shape, 2))
    return flat_slice.view_as(p)


@dataclass
class FlatGroup:
    """Parameters of one (device, dtype): the buffer, the views' offsets and sizes, and their names."""

    device: torch.device
    dtype: torch.dtype
    params: list[torch.nn.Parameter]
    names: list[str]
    offsets: list[int]  # element offset of each parameter in `data`
    data: torch.Tensor = field(repr=False)  # flat parameter buffer
    grad: torch.Tensor | None = field(default=None, repr=False)  # flat gradient buffer, made on demand

    @property
    def numel(self) -> int:
        return self.data.numel()

    @property
    def sizes(self) -> list[int]:
        return [storage_numel(p) for p in self.params]

    def view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s part of a flat buffer of this layout, shaped like the parameter."""
        p, off = self.params[i], self.offsets[i]
        return shaped_like(buffer[off : off + storage_numel(p)], p)

    def grad_buffer(self, link: bool = False) -> torch.Tensor:
        """The flat gradient buffer holding every parameter's current gradient (a missing one as zero).

        A gradient that is not already a view into the buffer is copied in.  With ``link=True`` it is
        then replaced by that view (``p.grad`` becomes a view, so later backward passes accumulate
        straight into the buffer); optimizers never link, since ``torch.optim`` leaves ``p.grad`` alone.
        """
        if self.grad is None:
            self.grad = torch.zeros_like(self.data)
        zeros, targets, sources, linked = [], [], [], []
        for i, (p, off) in enumerate(zip(self.params, self.offsets)):
            if not _aliases(p.grad, self.grad, off):
                view = self.view(self.grad, i)
                if p.grad is None:
                    zeros.append(view)
                elif p.grad.is_sparse:  # e.g. nn.Embedding(sparse=True): its rows, zeros elsewhere
                    if link:
                        raise ValueError("a sparse gradient cannot be linked into the dense flat gradient buffer")
                    view.copy_(p.grad.to_dense())
                else:
                    targets.append(view)
                    sources.append(p.grad)
                linked.append((p, view))
        # one multi-tensor launch each, not a copy per parameter
        if zeros:
            torch._foreach_zero_(zeros)
        if targets:
            torch._foreach_copy_(targets, sources)
        if link:
            for p, view in linked:
                p.grad = view
        return self.grad


def _aliases(view: torch.Tensor | None, buffer: torch.Tensor, offset: int) -> bool:
    if view is None:
        return False
    view = as_real(view)
    if view.device != buffer.device or view.dtype != buffer.dtype:
        return False
    if view.numel() == 0:  # nothing to alias (and an empty tensor's data_ptr() is 0)
        return True
    return view.is_contiguous() and view.data_ptr() == buffer.data_ptr() + offset * buffer.element_size()


class FlatParams:
    """Pack trainable parameters into one contiguous buffer per (device, dtype).

    Args:
        module_or_params: an ``nn.Module`` (parameter names come from ``named_parameters``) or an
            iterable of parameters.  Parameters with ``requires_grad=False`` are left alone; shared
            parameters are packed once.
    """

    def __init__(self, module_or_params: torch.nn.Module | Iterable[torch.nn.Parameter]):
        if isinstance(module_or_params, torch.nn.Module):
            named = list(module_or_params.named_parameters())
        else:
            named = [(f"param{i}", p) for i, p in enumerate(module_or_params)]
        seen, self._named = set(), []
        for name, p in named:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"FlatParams expects parameters, got {type(p).__name__} for {name!r}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._named.append((name, p))
        if not self._named:
            raise ValueError("FlatParams got no trainable parameters (none with requires_grad=True)")
        self.groups: list[FlatGroup] = []
        self.repack()

    # -- packing -----------------------------------------------------------------------------------
    def repack(self) -> "FlatParams":
        """(Re)build the buffers from the parameters' current values, devices and dtypes.

        Call after ``module.to(...)``; optimizer state tied to the old buffers must be rebuilt too.
        """
        keyed: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.nn.Parameter]]] = {}
        for name, p in self._named:
            keyed.setdefault((p.device, storage_dtype(p)), []).append((name, p))
        self.groups = []
        for (device, dtype), members in keyed.items():
            offsets, total = [], 0
            for _, p in members:
                offsets.append(total)
                total += storage_numel(p)
            data = torch.empty(total, dtype=dtype, device=device)
            for (_, p), off in zip(members, offsets):
                data[off : off + storage_numel(p)].copy_(as_real(p.detach()).reshape(-1))
            group = FlatGroup(device, dtype, [p for _, p in members], [n for n, _ in members], offsets, data)
            for i, p in enumerate(group.params):
                p.data = group.view(data, i)
            self.groups.append(group)
        return self

    def relink(self) -> None:
        """Point parameters that are no longer views back into their buffers, copying their current
        values in (``copy.deepcopy`` clones each parameter's data, for example).  Device and dtype must
        still match; use :meth:`repack` otherwise."""
        for group in self.groups:
            for i, (p, off) in enumerate(zip(group.params, group.offsets)):
                if not _aliases(p.data, group.data, off):
                    if p.device != group.device or storage_dtype(p) != group.dtype:
                        self.check()  # raises the stale-buffer error with the fix
                    group.data[off : off + storage_numel(p)].copy_(as_real(p.detach()).reshape(-1))
                    p.data = group.view(group.data, i)

    def check(self) -> None:
        """Raise :class:`StaleFlatParamsError` if any parameter stopped aliasing its buffer."""
        for group in self.groups:
            for name, p, off in zip(group.names, group.params, group.offsets):
                if not _aliases(p.data, group.data, off):
                    raise StaleFlatParamsError(
                        f"parameter {name!r} no longer lives in the flat buffer (now {p.dtype} on {p.device}, "
                        f"packed as {group.dtype} on {group.device}), e.g. after module.to()/.cuda(); "
                        "call FlatParams.repack() (and rebuild the optimizer) or build FlatParams after moving"
                    )

    # -- access ------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(g.numel for g in self.groups)

    def buffers(self) -> list[torch.Tensor]:
        """The flat parameter buffers, one per group, after checking they are still live."""
        self.check()
        return [g.data for g in self.groups]

    def grads(self) -> list[torch.Tensor]:
        """The flat gradient buffers, one per group, with every ``p.grad`` linked to a view into them
        (see :meth:`FlatGroup.grad_buffer`)."""
        self.check()
        return [group.grad_buffer(link=True) for group in self.groups]

    def zero_grad(self) -> None:
        """Zero the flat gradient buffers in place (keeping ``p.grad`` views, so backward fills them)."""
        for grad in self.grads():
            grad.zero_()

    def __repr__(self) -> str:
        parts = ", ".join(f"{len(g.params)} tensors/{g.numel} elements {g.dtype} on {g.device}" for g in self.groups)
        return f"FlatParams({parts})"
