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

import operator

import torch
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.optimizer import _get_scalar_dtype
from torch.optim.sgd import sgd as torch_sgd

from .. import kernels as K
from ._fused import _check_number, _check_tensor_hyperparameters, _FusedOptimizer, _identity, _lr_for, _lr_key
from .replicas import Replicas

#: what a prepared launcher depends on in a param group, besides the lr (one C call each step)
_SGD_SETTINGS = operator.itemgetter("weight_decay", "momentum", "dampening", "nesterov", "maximize", "l1")
_ADAMW_SETTINGS = operator.itemgetter("betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable", "l1")


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

    def _differentiable_step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            torch_sgd(
                params,
                [p.grad for p in params],
                buffers,
                has_sparse_grad=any(p.grad.is_sparse for p in params),
                foreach=False,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if group["momentum"] != 0:
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer

    def _settings(self, group, unit, gate):
        if gate is not None:
            raise ValueError("SGD has no device gate (a skipped SGD step is the caller's decision)")
        return (_lr_key(group, unit), unit.history, *_SGD_SETTINGS(group))

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
        if unit.direct and unit.group["capturable"]:
            return  # the launch advances the counts it reads (adamw_launcher's advance=)
        steps, mask = unit.bufs["step"], self._step_mask(unit)
        by = gate if gate is not None else 1
        steps.add_(by if mask is None else mask if gate is None else mask * gate)  # these counts, in one op

    def _differentiable_step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:  # torch.optim's lazy state: a float32 step (on the device when capturable)
                    device = p.device if group["capturable"] else None
                    state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            torch_adamw(
                params,
                [p.grad for p in params],
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                [st["max_exp_avg_sq"] for st in states] if group["amsgrad"] else [],
                [st["step"] for st in states],
                foreach=False,
                capturable=group["capturable"],
                differentiable=True,
                has_complex=any(p.is_complex() for p in params),
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )

    def _table_pays(self, unit):
        # 16-bit parameters with device scalars: each 1024-element program computes the bias corrections
        # in float64 over fewer bytes than in float32, and through a table (unaligned loads) that is
        # predicted at 0.63 of copy bandwidth on an H200, slower than copying the gradients first
        group = unit.group
        device_scalars = group["capturable"] or isinstance(_lr_for(group, unit.fg.data), torch.Tensor)
        return not (device_scalars and unit.fg.data.element_size() == 2)

    def _advance(self, unit) -> tuple:
        """What the kernel needs to advance the unit's step counts itself (``adamw_launcher``'s advance=)."""
        if unit.tickets is None:
            unit.tickets = torch.zeros(1, dtype=torch.int32, device=unit.fg.data.device)
        return unit.bufs["step"], self._step_mask(unit), unit.tickets

    def _step_mask(self, unit) -> torch.Tensor | None:
        """1 at the unit's parameters' step counts, 0 elsewhere; None when it has them all."""
        steps = unit.bufs["step"]
        if len(unit.indices) == len(steps):
            return None
        if unit.step_mask is None:
            unit.step_mask = torch.zeros_like(steps)
            unit.step_mask[unit.indices] = 1.0
        return unit.step_mask

    def _settings(self, group, unit, gate):
        return (_lr_key(group, unit), _identity(gate), *_ADAMW_SETTINGS(group))

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
            advance=self._advance(unit) if group["capturable"] and unit.direct else None,
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
