"""The base of :class:`subgrad.optim.SGD` and :class:`subgrad.optim.AdamW`: torch.optim's argument checks,
packing into flat buffers, and the step: a plan kept between steps (``_step_plan.py``), one prepared
launch per unit."""

from __future__ import annotations

import itertools
import math
import weakref

import torch

from .. import kernels as K
from ..flat import FlatGroup, FlatParams
from ..kernels.grad_table import GradTable
from ._flat_optimizer import FlatOptimizer
from ._step_plan import StepPlan, Unit, flat_slice, loose_gradient
from .replicas import Replicas

_WHAT = {
    "lr": "learning rate",
    "eps": "epsilon value",
    "momentum": "momentum value",
    "weight_decay": "weight_decay value",
    "dampening": "dampening value",
    "l1": "l1 value",
    "betas[0]": "beta parameter at index 0",
    "betas[1]": "beta parameter at index 1",
}


def _check_number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> float:
    """Validate one hyperparameter (a number, or a 1-element tensor, read once here) and return it as a
    float; the message is torch.optim's where torch checks the same condition."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if low_open else value >= low)
    if not (ok and (high is None or value < high)):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"Invalid {_WHAT[name]}: {value!r} (must be finite and {bound})")
    return float(value)


def _check_tensor_hyperparameters(lr, betas, foreach, capturable: bool) -> None:
    """torch.optim's rules for tensor ``lr`` / ``betas`` (its wording): both betas or neither, and no
    tensor with ``foreach=True`` unless capturable (torch's foreach path reads them as numbers)."""
    if isinstance(lr, torch.Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if betas is None:
        return
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) and foreach and not capturable:
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")


class _FusedOptimizer(FlatOptimizer):
    """Packing and state plumbing shared by :class:`SGD` and :class:`AdamW`."""

    _sparse_ok = False  # sparse gradients (SGD takes them densified: the same numbers as torch's sparse path)

    def __init__(self, params, defaults: dict, backend: str | None, replicas: Replicas | None):
        if backend not in (None, *K.BACKENDS):
            raise ValueError(f"backend must be None or one of {K.BACKENDS}, got {backend!r}")
        if defaults.get("differentiable") and (defaults.get("l1") or replicas is not None):
            raise ValueError(
                "differentiable=True runs torch.optim's own update (autograd through it), which has no l1 "
                "term and no replicas; drop them or differentiable=True"
            )
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        super().__init__(params, defaults)
        self.backend = backend
        self._packed: list[tuple[dict, FlatGroup, dict[str, torch.Tensor]]] | None = None  # + state buffers
        self._packed_for: tuple = ()  # the trainable parameters of each group when packed
        self._flats: list[FlatParams] = []
        #: steps each parameter has taken, counted on the host: which parameters can share a launch is
        #: decided from these, never from state on the device (no host read of a device value per step).
        #: Between plans the count lives in each unit's ``history`` (:meth:`_settle`).
        self._steps_taken: dict[torch.Tensor, int] = {}
        self._plan: StepPlan | None = None
        #: data-parallel ranks: the gradients are averaged over them before the update (None: one process)
        self.replicas = replicas
        self._handle = _register(self)

    def _pack(self) -> list[tuple[dict, FlatGroup, dict[str, torch.Tensor]]]:
        """The packed groups; repacked (state carried over) when the trainable parameters changed."""
        if self._packed is None or self._packed_for != self._trainable():
            self._flats, self._packed = [], []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.requires_grad]
                if params:
                    flat = FlatParams(params)  # copies the current values; p.data becomes a view into it
                    self._flats.append(flat)
                    self._packed += [(group, fg, {}) for fg in flat.groups]
            self._packed_for = self._trainable()
            self._adopt(self._packed)
        for flat in self._flats:
            flat.check()
        return self._packed

    def _adopt(self, packed) -> None:
        """State tensors into the flat buffers (``_adopt_state``), plus what a subclass keeps per group."""
        self._adopt_state((fg, bufs) for _, fg, bufs in packed)

    def _view(self, fg: FlatGroup, bufs: dict, key: str, i: int) -> torch.Tensor:
        return fg.view(self._flat_buffer(fg, bufs, key), i)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim semantics (values cast to each parameter's dtype and device), then the loaded
        tensors are copied into the flat buffers and ``state[p]`` points at views again."""
        capturable = [group.get("capturable", False) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, capturable):
            # where the step count lives is this optimizer's setting, not the saved state's: a graph captured
            # from a capturable optimizer must not start passing host step counts after a resume
            group["capturable"] = flag
            for key, value in self.defaults.items():  # a torch.optim state has no subgrad extras (l1)
                group.setdefault(key, value)
        self._steps_taken, self._plan = {}, None
        if not self.defaults.get("differentiable"):  # the differentiable path keeps torch's own state
            self._adopt(self._pack())

    def __getstate__(self) -> dict:
        if self._plan is not None:  # the copy plans afresh; this optimizer keeps its plan
            for unit in self._plan.units:
                self._record_history(unit)
        return {k: v for k, v in super().__getstate__().items() if k != "_plan"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plan = None
        self._handle = _register(self)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.defaults.get("differentiable"):
            with torch.enable_grad():  # autograd records the update, as torch.optim's differentiable step
                self._differentiable_step()
        elif torch.compiler.is_compiling():
            # traced by torch.compile: the whole step is one opaque op of the graph, which runs this
            # optimizer's eager step on the gradients the graph computed (bit-identical to eager)
            params = [p for group in self.param_groups for p in group["params"]]
            torch.ops.subgrad.fused_optimizer_step(self._handle, params, [p.grad for p in params])
        else:
            self._step(gate=None)
        return loss

    def _differentiable_step(self) -> None:
        """``differentiable=True``: torch.optim's single-tensor update in plain torch ops, with its own
        per-parameter state (no flat buffers, no kernels: autograd must see every operation)."""
        raise NotImplementedError

    def _step(self, gate: torch.Tensor | None, grads: list | None = None) -> None:
        """The update of every parameter that has a gradient; a device bool ``gate`` that is False makes
        it a no-op decided on the device (AdamW only: :class:`subgrad.optim.ActivityZO` skips that way).
        ``grads``: each parameter's gradient in ``param_groups`` order (None: their ``.grad``)."""
        plan, given = self._plan, grads
        if plan is not None:
            grads = [p.grad for p in plan.params] if given is None else given
            if not plan.reusable(grads, self.param_groups):
                plan = None
        if plan is None:
            plan = self._replan(given)
            if plan is None:
                return  # no gradient anywhere: nothing to update (and nothing to pack), as in torch.optim
            grads = plan.grads
        for unit in plan.units:
            self._launch_unit(unit, grads, gate, plan.grad_ptrs)

    def _replan(self, grads: list | None = None) -> StepPlan | None:
        """A new plan for the current parameters and gradients (after checking them as torch.optim does)."""
        self._settle()
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params] if grads is None else grads
        with_grad = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not with_grad:
            return None
        for p, g in with_grad:
            if p.device.type not in ("cpu", "cuda"):  # torch.optim's fused check, and its wording
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported "
                    f"devices: ['cpu', 'cuda'] but {p.dtype} and {p.device.type} (subgrad's step is "
                    "always fused)"
                )
            if not self._sparse_ok and g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (as torch.optim's)")
        self._plan = StepPlan(self.param_groups, grads, self._pack(), self._history, use_table=self.replicas is None)
        return self._plan

    def _settle(self) -> None:
        """Hand each unit's history back to the per-parameter record (before a new plan or a copy)."""
        if self._plan is not None:
            for unit in self._plan.units:
                self._record_history(unit)
            self._plan = None

    def _record_history(self, unit: Unit) -> None:
        """Per-parameter record of what ``unit.history`` advanced to (AdamW: the host step counts)."""

    def _launch_unit(self, unit: Unit, grads: list, gate, ptrs: list) -> None:
        """One unit's update: one launch on its gradients where they are, or per span / per parameter
        when they must be copied (replicas average a flat buffer; loose gradients are densified).
        ``ptrs``: the addresses of ``grads``, as the plan read them this step."""
        group, fg, bufs = unit.group, unit.fg, unit.bufs
        table = unit.grad if isinstance(unit.grad, GradTable) else None
        if table is not None:
            table.set_grads(unit.gradients(grads), unit.picked(ptrs))
        # linked gradients are read in place unless replicas must average them first (in a copy)
        direct = table is not None or (unit.grad is not None and self.replicas is None)
        if table is not None and not self._table_pays(unit):
            direct = False
        elif table is not None and fg.data.is_cuda and torch.cuda.is_current_stream_capturing() and table.moved():
            # a new address table would be copied from host memory that a replay cannot trust: copy the
            # gradients into the flat buffer instead (captured kernels; replays read the same gradients)
            direct = False
        unit.direct = direct
        self._begin(unit, gate)
        if direct:  # the whole buffer at once, with a launcher prepared while the settings stay the same
            key = (K._common.launch_epoch, *self._settings(group, unit, gate))
            if unit.launcher is None or unit.launcher[0] != key:
                unit.launcher = (key, self._launcher(group, fg, bufs, fg.data, unit.grad, slice(None), unit, gate))
            unit.launcher[1](*self._call_args(unit))
        else:
            given = dict(zip(unit.indices, unit.picked(grads)))
            for run in unit.runs:  # each run of parameters as one flat span, its gradients copied in
                first, last = flat_slice(fg, run.start), flat_slice(fg, run.stop - 1)
                where = slice(first.start, last.stop)
                if unit.loose:  # one parameter
                    grad = loose_gradient(given[run.start])
                else:
                    if fg.grad is None:
                        fg.grad = torch.zeros_like(fg.data)
                    grad = fg.grad[where]
                    views = [fg.view(fg.grad, i) for i in range(run.start, run.stop)]
                    torch._foreach_copy_(views, [given[i] for i in range(run.start, run.stop)])
                if self.replicas is not None:  # one collective per span; p.grad is never modified
                    self.replicas.all_reduce_mean_(grad)
                self._launcher(group, fg, bufs, fg.data[where], grad, where, unit, gate)(*self._call_args(unit))
        self._finish(unit)

    def _table_pays(self, unit: Unit) -> bool:
        """Whether reading the gradients through the table beats copying them into the flat buffer first
        (tests/test_compiled_cost.py checks the compiled kernels against that bound)."""
        return True

    def _begin(self, unit: Unit, gate) -> None:
        """Before a unit's launches (AdamW: advance the step counts the kernel reads, unless its one launch
        does: ``unit.direct``)."""

    def _finish(self, unit: Unit) -> None:
        """After a unit's launch: its state views on a first step, and its history advanced."""

    def _history(self, p) -> object:
        """What must agree for parameters to share one launch, known on the host (AdamW: steps taken)."""
        return self._steps_taken.get(p, 0)

    def _settings(self, group: dict, unit: Unit, gate) -> tuple:
        """What a prepared launcher depends on besides the buffers (a tensor by identity: the launcher
        holds it, so its id stays its own)."""
        raise NotImplementedError

    def _launcher(self, group, fg, bufs, param, grad, where: slice, unit: Unit, gate):
        """A function that updates ``param`` (``where`` in the flat buffers) from ``grad`` (a flat buffer
        like it, or an address table of the unit's gradients) when called with :meth:`_call_args`."""
        raise NotImplementedError

    def _call_args(self, unit: Unit) -> tuple:
        """What a launcher takes at each call (AdamW: the host step count)."""
        return ()


def _identity(value):
    """A settings-key entry: a tensor by identity (never compared by value: that would read it back)."""
    return ("tensor", id(value)) if isinstance(value, torch.Tensor) else value


def _lr_key(group: dict, unit: Unit):
    """The settings-key entry of the lr: its value where the launch takes it as a number (:func:`_lr_for`)."""
    lr = _lr_for(group, unit.fg.data)
    return _identity(lr)


def _lr_for(group: dict, param: torch.Tensor):
    """The group's lr as the kernel takes it: a tensor on the parameters' device is read by the kernel (no
    host read; a replay sees its current value); a number, or a tensor elsewhere (read here: a CPU value,
    no device synchronisation), travels as a launch argument."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.device != param.device:
        return float(lr)
    return lr


#: Live optimizers by handle: the compiled step's op names its optimizer by this number (an op takes no
#: Python objects); weak, so an optimizer's lifetime is its owner's.
_LIVE: weakref.WeakValueDictionary[int, _FusedOptimizer] = weakref.WeakValueDictionary()
_handles = itertools.count()


def _register(optimizer: _FusedOptimizer) -> int:
    handle = next(_handles)
    _LIVE[handle] = optimizer
    return handle


@torch.library.custom_op("subgrad::fused_optimizer_step", mutates_args=("params",))
def fused_optimizer_step(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """``step()`` of a subgrad SGD / AdamW as one op of a torch.compile graph: opaque to Inductor, which
    therefore cannot re-derive (and re-round) its arithmetic; ``grads`` are the graph's gradients,
    ``params`` what it updates in place."""
    optimizer = _LIVE.get(handle)
    if optimizer is None:
        raise RuntimeError(f"the optimizer of this compiled step (handle {handle}) no longer exists")
    with torch.no_grad():
        optimizer._step(gate=None, grads=list(grads))


@fused_optimizer_step.register_fake
def _(handle, params, grads) -> None:
    return None
