"""Fused first-order optimizers: ``torch.optim.SGD`` / ``AdamW`` semantics, one kernel launch per flat buffer.

Drop-in replacements: same constructor arguments, param groups, ``state_dict()`` layout (loadable both
ways with torch.optim), ``lr_scheduler`` and ``GradScaler`` support.  Each param group is packed into
flat buffers (:class:`subgrad.FlatParams`); its optimizer state lives in flat buffers of the same
layout and ``optimizer.state[p]`` holds views into them.  When every parameter of a buffer has a
gradient and the same state history, the step is one launch; otherwise (some ``p.grad is None``,
which torch.optim skips) each parameter is updated on its own view, with identical arithmetic.

The packing follows the parameters: a group added with ``add_param_group``, a parameter frozen or
unfrozen (``requires_grad``) between steps, is picked up at the next step by repacking, and every
parameter's state moves with it.  Gradients are read, never replaced: each step copies ``p.grad`` into
the flat gradient buffer (one extra pass over the gradients).  A complex parameter is stepped as its
real view (``torch.view_as_real``), as torch.optim does; its state tensors are complex like torch's.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import kernels as K
from ..flat import FlatGroup, FlatParams, as_real, storage_numel
from ._layout import FlatOptimizer


#: torch.optim's wording for each hyperparameter whose rule is torch's own ("Invalid learning rate: -1").
_WHAT = {"lr": "learning rate", "eps": "epsilon value", "momentum": "momentum value",
         "weight_decay": "weight_decay value", "dampening": "dampening value", "l1": "l1 value",
         "betas[0]": "beta parameter at index 0", "betas[1]": "beta parameter at index 1"}


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

    def __init__(self, params, defaults: dict, backend: str | None):
        if backend not in (None, *K.BACKENDS):
            raise ValueError(f"backend must be None or one of {K.BACKENDS}, got {backend!r}")
        if defaults.get("differentiable"):
            raise ValueError("differentiable=True (autograd through the update) is not supported: subgrad's step "
                             "is a fused kernel outside autograd; use torch.optim for it")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        super().__init__(params, defaults)
        self.backend = backend
        self._packed: list[tuple[dict, FlatGroup, dict[str, torch.Tensor]]] | None = None  # + state buffers
        self._packed_for: tuple = ()  # the trainable parameters of each group when packed
        self._flats: list[FlatParams] = []
        #: Callable averaging a flat gradient buffer over data-parallel ranks in place, after the gradients
        #: are copied into it and before the update (set by distributed training; None: one process).
        self.grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

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
            self._adopt_state((fg, bufs) for _, fg, bufs in self._packed)
        for flat in self._flats:
            flat.check()
        return self._packed

    def _view(self, fg: FlatGroup, bufs: dict, key: str, i: int) -> torch.Tensor:
        return fg.view(self._flat_buffer(fg, bufs, key), i)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim semantics (values cast to each parameter's dtype and device), then the loaded
        tensors are copied into the flat buffers and ``state[p]`` points at views again."""
        super().load_state_dict(state_dict)
        self._adopt_state((fg, bufs) for _, fg, bufs in self._pack())

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
        for group, fg, bufs in self._pack():
            has_grad = [p.grad is not None for p in fg.params]
            if not any(has_grad):
                continue
            if not self._sparse_ok and any(p.grad is not None and p.grad.is_sparse for p in fg.params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (as torch.optim's)")
            histories = {self._history(p) for p in fg.params}
            if all(has_grad) and len(histories) == 1:
                grad = fg.grad_buffer(link=False)
                if self.grad_reduce is not None:
                    self.grad_reduce(grad)  # one collective over the whole flat buffer
                self._step_views(group, fg, bufs, fg.data, grad, slice(None), list(range(len(fg.params))))
            else:  # torch.optim skips params without gradients: update the others one by one
                for i, p in enumerate(fg.params):
                    if p.grad is not None:
                        off = fg.offsets[i]
                        grad = as_real(p.grad.to_dense() if p.grad.is_sparse else p.grad)
                        if self.grad_reduce is not None:  # reduce a copy: p.grad is never modified
                            grad = self.grad_reduce(grad.clone())
                        where = slice(off, off + storage_numel(p))
                        self._step_views(group, fg, bufs, fg.data[where], grad.reshape(-1), where, [i])
        return loss

    def _history(self, p) -> object:
        """What must agree for parameters to share one launch (first step or not, step count)."""
        raise NotImplementedError

    def _step_views(self, group, fg, bufs, param, grad, where: slice, indices: list[int]) -> None:
        """Update ``param`` (all of ``fg`` or one parameter's view, ``where`` in the flat buffers)."""
        raise NotImplementedError


class SGD(_FusedOptimizer):
    """``torch.optim.SGD`` with a fused Triton update (torch twin on CPU).  Extra: ``l1`` adds the
    subgradient ``l1 * sign(w)``; ``backend`` picks the kernel backend."""

    _buffer_keys = ("momentum_buffer",)
    _sparse_ok = True

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False, foreach=None,
                 differentiable: bool = False, fused=None, l1: float = 0.0, backend: str | None = None):
        _check_number("lr", lr, 0.0, tensor_ok=True)  # a tensor lr is read at each step
        _check_number("momentum", momentum, 0.0)
        _check_number("dampening", dampening, 0.0)
        _check_number("weight_decay", weight_decay, 0.0)
        _check_number("l1", l1, 0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused, l1=l1)
        super().__init__(params, defaults, backend)

    def _history(self, p):
        return self.state.get(p, {}).get("momentum_buffer") is None

    def _step_views(self, group, fg, bufs, param, grad, where, indices):
        momentum = group["momentum"]
        first = self._history(fg.params[indices[0]])
        buf = self._flat_buffer(fg, bufs, "momentum_buffer")[where] if momentum != 0 else None
        K.sgd_step_(param, grad, buf, lr=float(group["lr"]), weight_decay=group["weight_decay"], momentum=momentum,
                    dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                    first_step=first, l1=group.get("l1", 0.0), backend=self.backend)
        for i in indices:  # like torch.optim: no state at all without momentum
            if momentum:
                self.state[fg.params[i]]["momentum_buffer"] = self._view(fg, bufs, "momentum_buffer", i)


class AdamW(_FusedOptimizer):
    """``torch.optim.AdamW`` with a fused Triton update (torch twin on CPU).  Extra: ``l1`` adds the
    subgradient ``l1 * sign(w)`` to the gradient; ``backend`` picks the kernel backend."""

    _buffer_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False, foreach=None,
                 capturable: bool = False, differentiable: bool = False, fused=None, l1: float = 0.0,
                 backend: str | None = None):
        _check_number("lr", lr, 0.0, tensor_ok=True)  # a tensor lr is read at each step
        _check_number("eps", eps, 0.0, low_open=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0)
        _check_number("betas[1]", betas[1], 0.0, 1.0)
        _check_number("weight_decay", weight_decay, 0.0)
        _check_number("l1", l1, 0.0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=True, l1=l1)
        super().__init__(params, defaults, backend)

    def _history(self, p):
        step = self.state.get(p, {}).get("step")
        return 0 if step is None else int(step)

    def _step_views(self, group, fg, bufs, param, grad, where, indices):
        first = fg.params[indices[0]]
        step = self._history(first) + 1
        beta1, beta2 = group["betas"]
        vmax = self._flat_buffer(fg, bufs, "max_exp_avg_sq")[where] if group["amsgrad"] else None
        K.adamw_step_(param, grad, self._flat_buffer(fg, bufs, "exp_avg")[where],
                      self._flat_buffer(fg, bufs, "exp_avg_sq")[where], vmax, step=step, lr=float(group["lr"]),
                      beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                      l1=group.get("l1", 0.0), backend=self.backend)
        for i in indices:
            st = self.state[fg.params[i]]
            st["step"] = torch.tensor(float(step), dtype=torch.float32)  # torch.optim keeps a CPU float tensor
            st["exp_avg"] = self._view(fg, bufs, "exp_avg", i)
            st["exp_avg_sq"] = self._view(fg, bufs, "exp_avg_sq", i)
            if group["amsgrad"]:
                st["max_exp_avg_sq"] = self._view(fg, bufs, "max_exp_avg_sq", i)
