"""Fused first-order optimizers: ``torch.optim.SGD`` / ``AdamW`` semantics, one kernel launch per flat buffer.

Drop-in replacements: same constructor arguments, param groups, ``state_dict()`` layout (loadable both
ways with torch.optim), ``lr_scheduler`` and ``GradScaler`` support.  Each param group is packed into
flat buffers (:class:`subgrad.FlatParams`); its optimizer state lives in flat buffers of the same
layout and ``optimizer.state[p]`` holds views into them.  A step is one launch per flat buffer: the
kernel reads each gradient where backward left it, through a table of their addresses (parameters
without a gradient, which torch.optim skips, are not in the table); see ``_step_plan.py``.  The plan of
that launch is kept between steps, so a step's host work is reading ``p.grad`` of each parameter and
launching.

The packing follows the parameters: a group added with ``add_param_group``, a parameter frozen or
unfrozen (``requires_grad``) between steps, is picked up at the next step by repacking, and every
parameter's state moves with it.  Gradients are read, never replaced.  A complex parameter is stepped
as its real view (``torch.view_as_real``), as torch.optim does; its state tensors are complex like torch's.
"""

from __future__ import annotations

import math

import torch

from .. import kernels as K
from ..flat import FlatGroup, FlatParams
from ..kernels.grad_table import GradTable
from ._flat_optimizer import FlatOptimizer
from ._step_plan import StepPlan, Unit, flat_slice, loose_gradient
from .replicas import Replicas

#: torch.optim's wording for each hyperparameter whose rule is torch's own ("Invalid learning rate: -1").
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
        if defaults.get("differentiable"):
            raise ValueError(
                "differentiable=True (autograd through the update) is not supported: subgrad's step "
                "is a fused kernel outside autograd; use torch.optim for it"
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
        self._steps_taken, self._plan = {}, None
        self._adopt(self._pack())

    def __getstate__(self) -> dict:
        if self._plan is not None:  # the copy plans afresh; this optimizer keeps its plan
            for unit in self._plan.units:
                self._record_history(unit)
        return {k: v for k, v in super().__getstate__().items() if k != "_plan"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plan = None

    # Under torch.compile the step runs eagerly (a graph break): it is already one fused kernel per flat
    # buffer, and tracing its host-side scalar preparation sent dynamo into endless recursion.  (The
    # decorator torch.optim itself uses: it imports dynamo on first call, not at import.)
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step(gate=None)
        return loss

    def _step(self, gate: torch.Tensor | None) -> None:
        """The update of every parameter that has a gradient; a device bool ``gate`` that is False makes
        it a no-op decided on the device (AdamW only: :class:`subgrad.optim.ActivityZO` skips that way)."""
        plan = self._plan
        if plan is not None:
            grads = [p.grad for p in plan.params]
            if not plan.reusable(grads, self.param_groups):
                plan = None
        if plan is None:
            plan = self._replan()
            if plan is None:
                return  # no gradient anywhere: nothing to update (and nothing to pack), as in torch.optim
            grads = plan.grads
        for unit in plan.units:
            self._launch_unit(unit, grads, gate)

    def _replan(self) -> StepPlan | None:
        """A new plan for the current parameters and gradients (after checking them as torch.optim does)."""
        self._settle()
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not with_grad:
            return None
        for p in with_grad:
            if p.device.type not in ("cpu", "cuda"):  # torch.optim's fused check, and its wording
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported "
                    f"devices: ['cpu', 'cuda'] but {p.dtype} and {p.device.type} (subgrad's step is "
                    "always fused)"
                )
            if not self._sparse_ok and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (as torch.optim's)")
        self._plan = StepPlan(self.param_groups, self._pack(), self._history, use_table=self.replicas is None)
        return self._plan

    def _settle(self) -> None:
        """Hand each unit's history back to the per-parameter record (before a new plan or a copy)."""
        if self._plan is not None:
            for unit in self._plan.units:
                self._record_history(unit)
            self._plan = None

    def _record_history(self, unit: Unit) -> None:
        """Per-parameter record of what ``unit.history`` advanced to (AdamW: the host step counts)."""

    def _launch_unit(self, unit: Unit, grads: list, gate) -> None:
        """One unit's update: one launch on its gradients where they are, or per span / per parameter
        when they must be copied (replicas average a flat buffer; loose gradients are densified)."""
        group, fg, bufs = unit.group, unit.fg, unit.bufs
        self._begin(unit, gate)
        table = unit.grad if isinstance(unit.grad, GradTable) else None
        if table is not None:
            table.set_grads(unit.gradients(grads))
        # linked gradients are read in place unless replicas must average them first (in a copy)
        direct = table is not None or (unit.grad is not None and self.replicas is None)
        if table is not None and fg.data.is_cuda and torch.cuda.is_current_stream_capturing() and table.moved():
            # a new address table would be copied from host memory that a replay cannot trust: copy the
            # gradients into the flat buffer instead (captured kernels; replays read the same gradients)
            direct = False
        if direct:  # the whole buffer at once, with a launcher prepared while the settings stay the same
            key = (K._common.launch_epoch, *self._settings(group, unit, gate))
            if unit.launcher is None or unit.launcher[0] != key:
                unit.launcher = (key, self._launcher(group, fg, bufs, fg.data, unit.grad, slice(None), unit, gate))
            unit.launcher[1](*self._call_args(unit))
        else:
            for run in unit.runs:  # each run of parameters as one flat span, its gradients copied in
                first, last = flat_slice(fg, run.start), flat_slice(fg, run.stop - 1)
                where = slice(first.start, last.stop)
                if unit.loose:  # one parameter
                    grad = loose_gradient(fg.params[run.start])
                else:
                    if fg.grad is None:
                        fg.grad = torch.zeros_like(fg.data)
                    grad = fg.grad[where]
                    views = [fg.view(fg.grad, i) for i in range(run.start, run.stop)]
                    torch._foreach_copy_(views, [fg.params[i].grad for i in range(run.start, run.stop)])
                if self.replicas is not None:  # one collective per span; p.grad is never modified
                    self.replicas.all_reduce_mean_(grad)
                self._launcher(group, fg, bufs, fg.data[where], grad, where, unit, gate)(*self._call_args(unit))
        self._finish(unit)

    def _begin(self, unit: Unit, gate) -> None:
        """Before a unit's launch (AdamW: advance the step counts the kernel reads)."""

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


class SGD(_FusedOptimizer):
    """``torch.optim.SGD`` with a fused Triton update (torch twin on CPU).

    Extras: ``l1`` adds the subgradient ``l1 * sign(w)``; ``backend`` picks the kernel backend; ``replicas``
    (:class:`subgrad.optim.replicas.Replicas`) averages the gradients over data-parallel ranks first.
    ``foreach`` and ``fused`` are accepted and change nothing: they choose among torch.optim's
    implementations of the same update, and subgrad's one fused implementation serves every choice
    (its numbers are torch's within the tolerances in tests/test_optim_torch_suite.py).  ``capturable``
    (torch's SGD has no such flag; accepted for symmetry with AdamW) changes nothing either: the step
    never reads a device value on the host, and a tensor ``lr`` on the parameters' device is read by the
    kernel, so a CUDA graph of the step uses its current value.
    """

    _buffer_keys = ("momentum_buffer",)
    _sparse_ok = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach=None,
        differentiable: bool = False,
        fused=None,
        capturable: bool = False,
        l1: float = 0.0,
        backend: str | None = None,
        replicas: Replicas | None = None,
    ):
        _check_tensor_hyperparameters(lr, None, foreach, capturable=True)  # SGD's foreach takes a tensor lr
        _check_number("lr", lr, 0.0)
        _check_number("momentum", momentum, 0.0)
        _check_number("dampening", dampening, 0.0)
        _check_number("weight_decay", weight_decay, 0.0)
        _check_number("l1", l1, 0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            capturable=capturable,
            l1=l1,
        )
        super().__init__(params, defaults, backend, replicas)

    def _history(self, p):
        return self.state.get(p, {}).get("momentum_buffer") is None  # first step or not

    def _settings(self, group, unit, gate):
        if gate is not None:
            raise ValueError("SGD has no device gate (a skipped SGD step is the caller's decision)")
        keys = ("weight_decay", "momentum", "dampening", "nesterov", "maximize", "l1")
        return (_lr_key(group, unit), unit.history, *(group.get(k) for k in keys))

    def _launcher(self, group, fg, bufs, param, grad, where, unit, gate):
        momentum = group["momentum"]
        return K.sgd_launcher(
            param,
            grad,
            self._flat_buffer(fg, bufs, "momentum_buffer")[where] if momentum != 0 else None,
            lr=_lr_for(group, param),
            weight_decay=group["weight_decay"],
            momentum=momentum,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            first_step=unit.history,
            l1=group.get("l1", 0.0),
            backend=self.backend,
        )

    def _finish(self, unit):
        if unit.history and unit.group["momentum"]:  # like torch.optim: no state at all without momentum
            for i in unit.indices:
                self.state[unit.fg.params[i]]["momentum_buffer"] = self._view(unit.fg, unit.bufs, "momentum_buffer", i)
            unit.history = False
            self._plan = None  # plan again: units that differed only by this may share a launch now


class AdamW(_FusedOptimizer):
    """``torch.optim.AdamW`` with a fused Triton update (torch twin on CPU).

    Extras: ``l1`` adds the subgradient ``l1 * sign(w)`` to the gradient; ``backend`` picks the kernel
    backend; ``replicas`` as for :class:`SGD`.  ``foreach`` and ``fused`` are accepted and change nothing.

    ``capturable=True`` has torch.optim's meaning: each parameter's ``step`` lives on its device (views of
    one float32 vector per flat buffer, advanced by one op per step) and the kernel computes the bias
    corrections from it and from the lr (a tensor lr on the device is read by the kernel), so the step
    takes no host value that changes and can be captured in a CUDA graph.  Its scalars are computed in
    float64 on the device (kernels/adamw.py), within a float32 rounding of the host path's.
    """

    _buffer_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach=None,
        capturable: bool = False,
        differentiable: bool = False,
        fused=None,
        l1: float = 0.0,
        backend: str | None = None,
        replicas: Replicas | None = None,
    ):
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_tensor_hyperparameters(lr, betas, foreach, capturable)
        _check_number("lr", lr, 0.0)
        _check_number("eps", eps, 0.0, low_open=True)
        betas = (_check_number("betas[0]", betas[0], 0.0, 1.0), _check_number("betas[1]", betas[1], 0.0, 1.0))
        _check_number("weight_decay", weight_decay, 0.0)
        _check_number("l1", l1, 0.0)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            l1=l1,
        )
        super().__init__(params, defaults, backend, replicas)

    def _adopt(self, packed) -> None:
        """Moments into the flat buffers; each parameter's step into its group's step vector (CPU, or the
        device when capturable, as torch.optim keeps it), counted on the host from the loaded values."""
        super()._adopt(packed)
        for group, fg, bufs in packed:
            device = fg.data.device if group["capturable"] else torch.device("cpu")
            if bufs.get("step") is None or bufs["step"].device != device:
                bufs["step"] = torch.zeros(len(fg.params), dtype=torch.float32, device=device)
            for i, p in enumerate(fg.params):
                step = self.state.get(p, {}).get("step")
                if step is None:
                    continue
                if p not in self._steps_taken:  # a loaded state (read once, here): the host count follows it
                    self._steps_taken[p] = int(step)
                view = bufs["step"][i]
                if step is not view:
                    view.copy_(torch.as_tensor(step, dtype=torch.float32))
                    self.state[p]["step"] = view

    def _begin(self, unit, gate):
        if gate is not None and not unit.group["capturable"]:
            raise ValueError("a gated AdamW step needs capturable=True (the step count then lives on the device)")
        steps = unit.bufs["step"]
        if len(unit.indices) == len(steps):
            steps.add_(gate if gate is not None else 1)
        else:  # these parameters' step counts, in one op whatever their positions
            if unit.step_mask is None:
                unit.step_mask = torch.zeros_like(steps)
                unit.step_mask[unit.indices] = 1.0
            steps.add_(unit.step_mask if gate is None else unit.step_mask * gate)

    def _settings(self, group, unit, gate):
        keys = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable", "l1")
        return (_lr_key(group, unit), _identity(gate), *(group.get(k) for k in keys))

    def _call_args(self, unit):
        return (unit.history + 1,)  # this step's count, on the host (a capturable kernel reads its own)

    def _launcher(self, group, fg, bufs, param, grad, where, unit, gate):
        beta1, beta2 = group["betas"]
        first = unit.indices[0]
        # capturable: read by the kernel; otherwise counted on the host, so no value is read back
        step = bufs["step"][first : first + 1] if group["capturable"] else unit.history + 1
        return K.adamw_launcher(
            param,
            grad,
            self._flat_buffer(fg, bufs, "exp_avg")[where],
            self._flat_buffer(fg, bufs, "exp_avg_sq")[where],
            self._flat_buffer(fg, bufs, "max_exp_avg_sq")[where] if group["amsgrad"] else None,
            step=step,
            lr=_lr_for(group, param),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            l1=group.get("l1", 0.0),
            gate=gate,
            backend=self.backend,
        )

    def _finish(self, unit):
        if unit.history == 0:  # a first step: the state appears, as views of the flat buffers
            fg, bufs = unit.fg, unit.bufs
            for i in unit.indices:
                st = self.state[fg.params[i]]
                st["step"] = bufs["step"][i]
                st["exp_avg"] = self._view(fg, bufs, "exp_avg", i)
                st["exp_avg_sq"] = self._view(fg, bufs, "exp_avg_sq", i)
                if unit.group["amsgrad"]:
                    st["max_exp_avg_sq"] = self._view(fg, bufs, "max_exp_avg_sq", i)
        unit.history += 1

    def _record_history(self, unit):
        for p in unit.params:
            self._steps_taken[p] = unit.history
