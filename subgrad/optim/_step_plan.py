"""The plan of a fused first-order step, built when the parameters or their gradients change and reused
in between, so that a step's host work is reading the gradients and one launch per unit.

A *unit* is the parameters of one flat buffer that have a gradient and share a history (SGD: whether the
momentum buffer exists; AdamW: steps taken), updated by one kernel launch.  Its gradients are read where
they are: the flat gradient buffer when ``FlatParams.grads()`` linked them into it, otherwise through a
:class:`subgrad.kernels.grad_table.GradTable` of their addresses.  Only gradients that are sparse or not
contiguous (``loose``) take the per-parameter path.

A step reuses the plan when the groups, every parameter's storage and every gradient's address are as
when it was built (:meth:`StepPlan.reusable`); gradients that moved but are present for the same
parameters (``zero_grad(set_to_none=True)`` with an allocator that did not hand back the same blocks)
only re-address the tables.  Anything else rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..flat import FlatGroup, _aliases, as_real, storage_numel
from ..kernels.grad_table import GradTable


@dataclass
class Unit:
    """Parameters of one flat buffer updated by one launch."""

    group: dict  # their param group (hyperparameters)
    fg: FlatGroup
    bufs: dict  # the flat state buffers of ``fg``
    indices: list[int]  # positions in ``fg.params``
    pick: slice | list[int]  # positions of their gradients in the plan's gradient list
    history: object  # what they share (see module docstring), advanced by the optimizer after each step
    grad: torch.Tensor | GradTable | None = None  # None: copied into the flat gradient buffer first
    loose: bool = False  # one parameter whose gradient is sparse or strided (densified each step)
    real_views: bool = False  # a complex gradient among them: read as its real view
    runs: list[slice] = field(default_factory=list)  # consecutive runs of ``indices``
    launcher: tuple | None = None  # (settings, prepared launch function), kept while the settings hold
    step_mask: torch.Tensor | None = None  # AdamW: 1 at these parameters' step counts, 0 elsewhere
    tickets: torch.Tensor | None = None  # AdamW: the update kernel's ticket counter (one int32, kept at 0)
    direct: bool = True  # this step launches once on the whole buffer (else per span, gradients copied)

    def __post_init__(self):
        start = self.indices[0]
        for i, j in zip(self.indices, self.indices[1:] + [None]):
            if j != i + 1:
                self.runs.append(slice(start, i + 1))
                start = j

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.fg.params[i] for i in self.indices]

    def picked(self, grads: list) -> list[torch.Tensor]:
        """These parameters' gradients, from the step's list of every parameter's."""
        return grads[self.pick] if isinstance(self.pick, slice) else [grads[i] for i in self.pick]

    def gradients(self, grads: list) -> list[torch.Tensor]:
        """:meth:`picked`, a complex one as its real view (what a kernel reads)."""
        picked = self.picked(grads)
        return [as_real(g) for g in picked] if self.real_views else picked


def _pick(positions: list[int]) -> slice | list[int]:
    """A slice when the positions are consecutive (cheaper to take each step)."""
    if positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return positions


class StepPlan:
    """Units of one step, and what must not change for the next step to reuse them."""

    def __init__(self, param_groups: list[dict], grads: list, packed, history, use_table: bool):
        """``grads``: each parameter's gradient in ``param_groups`` order; ``packed``: ``(group, FlatGroup,
        buffers)`` of the packed parameters; ``history(p)``: what parameters must share to share a launch;
        ``use_table``: read gradients through address tables (False: data-parallel replicas, which
        average a flat gradient buffer)."""
        self.groups_key = _groups_key(param_groups)
        self.params = [p for group in param_groups for p in group["params"]]
        self.grads = grads
        self.param_ptrs = [p.data_ptr() for p in self.params]
        # a sparse gradient has no address: the next step, unable to read one, plans again
        self.grad_ptrs = [None if g is None else -1 if g.is_sparse else g.data_ptr() for g in self.grads]
        position = {id(p): i for i, p in enumerate(self.params)}
        self.units: list[Unit] = []
        for group, fg, bufs in packed:
            by_history: dict[object, list[int]] = {}
            loose = []
            for i, p in enumerate(fg.params):
                g = grads[position[id(p)]]
                if g is None:
                    continue
                if g.is_sparse or not g.is_contiguous():
                    loose.append(i)
                else:
                    by_history.setdefault(history(p), []).append(i)
            for key, indices in by_history.items():
                unit = Unit(group, fg, bufs, indices, _pick([position[id(fg.params[i])] for i in indices]), key)
                unit.real_views = any(fg.params[i].is_complex() for i in indices)
                covers_all = len(indices) == len(fg.params)
                if (
                    covers_all
                    and fg.grad is not None
                    and all(_aliases(grads[position[id(p)]], fg.grad, off) for p, off in zip(fg.params, fg.offsets))
                ):
                    unit.grad = fg.grad  # linked by FlatParams.grads(): already one flat buffer
                elif use_table:
                    shapes = [tuple(as_real(fg.params[i]).shape) for i in indices]
                    unit.grad = GradTable([fg.offsets[i] for i in indices], shapes, fg.data)
                self.units.append(unit)
            for i in loose:
                p = fg.params[i]
                self.units.append(Unit(group, fg, bufs, [i], [position[id(p)]], history(p), loose=True))

    def reusable(self, grads: list, param_groups: list[dict]) -> bool:
        """Whether this step may reuse the plan: same groups and parameter storage, each gradient present
        for the same parameters, dense and contiguous (tables re-addressed when one moved)."""
        try:
            ptrs = _grad_ptrs(grads)
        except RuntimeError:  # a sparse gradient has no data pointer
            return False
        if ptrs != self.grad_ptrs:
            if [p is None for p in ptrs] != [p is None for p in self.grad_ptrs]:
                return False
            if not all(g.is_contiguous() for g in grads if g is not None):
                return False
            self.grad_ptrs = ptrs
        return [p.data_ptr() for p in self.params] == self.param_ptrs and _groups_key(param_groups) == self.groups_key


def _grad_ptrs(grads: list) -> list:
    return [None if g is None else g.data_ptr() for g in grads]


def _groups_key(param_groups: list[dict]) -> tuple:
    return tuple((id(group["params"]), len(group["params"])) for group in param_groups)


def loose_gradient(g: torch.Tensor) -> torch.Tensor:
    """A sparse or strided gradient as a dense, contiguous flat tensor (a copy)."""
    g = g.to_dense() if g.is_sparse else g
    return as_real(g).reshape(-1).contiguous()


def flat_slice(fg: FlatGroup, i: int) -> slice:
    """Parameter ``i``'s elements in ``fg``'s flat buffers."""
    return slice(fg.offsets[i], fg.offsets[i] + storage_numel(fg.params[i]))
