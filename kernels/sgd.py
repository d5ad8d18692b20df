"""Fused SGD step with ``torch.optim.SGD`` semantics, one launch per flat buffer.

    g = -grad if maximize else grad
    g = g + weight_decay * w                      (if weight_decay != 0)
    g = g + l1 * sign(w)                          (if l1 != 0; subgradient of l1 * |w|)
    buf = g  (first step)  or  buf = momentum * buf + (1 - dampening) * g   (if momentum != 0)
    g = g + momentum * buf  (nesterov)  or  g = buf
    w = w - lr * g

Parameters, gradients and the momentum buffer may be float32, bfloat16 or float16; arithmetic is
float32 and each tensor is rounded once when stored.  float64 buffers are updated by the torch twin in
float64 (as torch.optim does), on any device.

``grad`` is a flat buffer like ``param``, or a :class:`GradTable` of the gradients where backward left
them (the same launch, each program reading its parameter's gradient through the table).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import (
    INPLACE_CHUNK,
    NUM_WARPS,
    TILE_SIZE,
    check_contiguous,
    check_float_dtype,
    check_nonnegative,
    check_same_layout,
    chunks,
    device_scalar,
    f32,
    float64_twin,
    grid,
    host_scalar,
    resolve_backend,
    round_to,
    sign,
    stale_copy,
    workspace,
)
from .grad_table import GradTable, tile_positions, twin_views


@triton.jit
def sgd_kernel(
    param_ptr,  # *float [n]: parameters, updated in place
    grad_ptr,  # *float [n]: gradients (read only); with GRAD_TABLE: *int64 [parameters], their addresses
    momentum_ptr,  # *float [n]: momentum buffer when HAS_MOMENTUM (else unused)
    lr_ptr,  # *fp32 [1]: the learning rate when LR_IN_MEMORY (else unused)
    tiles_ptr,  # *int64 [programs, 4]: with GRAD_TABLE, each program's tile (grad_table.py; else unused)
    n,  # number of elements (without GRAD_TABLE)
    lr,  # fp32 learning rate (unless LR_IN_MEMORY)
    weight_decay,  # fp32 L2 coefficient
    l1,  # fp32 L1 coefficient (subgradient l1 * sign(w))
    momentum,  # fp32 momentum factor
    one_minus_dampening,  # fp32 (1 - dampening)
    MAXIMIZE: tl.constexpr,  # ascend instead of descend
    HAS_WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    HAS_L1: tl.constexpr,  # l1 != 0
    HAS_MOMENTUM: tl.constexpr,  # momentum != 0
    FIRST_STEP: tl.constexpr,  # momentum buffer is initialised to g (torch.optim semantics)
    NESTEROV: tl.constexpr,  # Nesterov momentum
    LR_IN_MEMORY: tl.constexpr,  # read lr from lr_ptr (a tensor lr: no host read, replayable launches)
    GRAD_TABLE: tl.constexpr,  # gradients through an address table, programs through a tile table
    TILE_SIZE: tl.constexpr,  # elements per program
):
    if LR_IN_MEMORY:
        lr = tl.load(lr_ptr)
    pos, mask, grad_at = tile_positions(tiles_ptr, grad_ptr, param_ptr, n, GRAD_TABLE, TILE_SIZE)
    w = tl.load(param_ptr + pos, mask=mask).to(tl.float32)
    g = tl.load(grad_at, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * w
    if HAS_L1:
        g = g + l1 * sign(w)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = g
        else:
            buf = momentum * tl.load(momentum_ptr + pos, mask=mask).to(tl.float32) + one_minus_dampening * g
        buf = round_to(buf, momentum_ptr.dtype.element_ty)  # torch keeps the buffer in its own dtype
        tl.store(momentum_ptr + pos, buf, mask=mask)
        if NESTEROV:
            g = g + momentum * buf.to(tl.float32)
        else:
            g = buf.to(tl.float32)
    w = w - lr * g
    tl.store(param_ptr + pos, round_to(w, param_ptr.dtype.element_ty), mask=mask)


def sgd_torch(
    param,
    grad,
    momentum_buffer,
    lr,
    weight_decay,
    l1,
    momentum,
    one_minus_dampening,
    maximize,
    first_step,
    nesterov,
    compute=torch.float32,
    grad_writable: bool = False,
) -> None:
    """Torch twin of :func:`sgd_kernel` (cache-sized chunks of the flat buffers); ``compute=float64``
    is the float64 path.  Buffers already in the compute dtype take :func:`_sgd_in_place`, which may
    compute in ``grad`` itself when ``grad_writable`` (a private copy, not ``p.grad``)."""
    param, grad = param.view(-1), grad.view(-1)
    momentum_buffer = momentum_buffer.view(-1) if momentum_buffer is not None else None
    if param.dtype == grad.dtype == compute and (momentum_buffer is None or momentum_buffer.dtype == compute):
        _sgd_in_place(
            param,
            grad,
            momentum_buffer,
            lr,
            weight_decay,
            l1,
            momentum,
            one_minus_dampening,
            maximize,
            first_step,
            nesterov,
            grad_writable,
        )
        return
    for a, b in chunks(param.numel()):
        w = param[a:b].to(compute)
        g = grad[a:b].to(compute)
        if maximize:
            g = -g
        if weight_decay != 0.0:
            g = g + w * weight_decay
        if l1 != 0.0:
            g = g + torch.sign(w) * l1
        if momentum != 0.0:
            if first_step:
                buf = g
            else:
                buf = momentum_buffer[a:b].to(compute) * momentum + g * one_minus_dampening
            buf = buf.to(momentum_buffer.dtype)
            momentum_buffer[a:b] = buf
            g = g + buf.to(compute) * momentum if nesterov else buf.to(compute)
        param[a:b] = (w - g * lr).to(param.dtype)


def _sgd_in_place(
    param, grad, buf, lr, weight_decay, l1, momentum, one_minus_dampening, maximize, first, nesterov, grad_writable
):
    """:func:`sgd_torch` when every buffer is in the compute dtype: the same operations in the same order,
    each written into the buffers or a kept workspace (``out=``) rather than a fresh tensor."""
    for a, b in chunks(param.numel(), INPLACE_CHUNK):
        w, g = param[a:b], grad[a:b]
        g_new, tmp = workspace(2, b - a, param.dtype, param.device)
        if maximize or weight_decay != 0.0 or l1 != 0.0 or (momentum != 0.0 and nesterov):
            target = g if grad_writable else g_new  # modified below; p.grad is never written
            if maximize:
                torch.neg(g, out=target)
            elif target is not g:
                target.copy_(g)
            g = target
        if weight_decay != 0.0:
            g.add_(torch.mul(w, weight_decay, out=tmp))
        if l1 != 0.0:
            g.add_(torch.sign(w, out=tmp).mul_(l1))
        if momentum != 0.0:
            m = buf[a:b]
            if first:
                m.copy_(g)
            else:
                # g * 1.0 is g, bit for bit: no dampening, no multiplication
                m.mul_(momentum).add_(g if one_minus_dampening == 1.0 else torch.mul(g, one_minus_dampening, out=tmp))
            g = g.add_(torch.mul(m, momentum, out=tmp)) if nesterov else m
        w.sub_(torch.mul(g, lr, out=tmp))


def sgd_step_(
    param: torch.Tensor,
    grad: torch.Tensor | GradTable,
    momentum_buffer: torch.Tensor | None = None,
    *,
    lr: float | torch.Tensor,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    l1: float = 0.0,
    backend: str | None = None,
    validate_args: bool = True,
) -> torch.Tensor:
    """One fused SGD step on a contiguous buffer (usually a whole :class:`subgrad.FlatParams` group).

    ``l1`` adds the subgradient ``l1 * sign(w)`` (an extension; torch.optim has none).
    ``first_step`` says the momentum buffer is new (``torch.optim`` sets it to the gradient instead of
    decaying it).  ``lr`` may be a 1-element tensor on the device, which the kernel reads (no host read;
    a replayed launch uses its current value).  ``grad``: a buffer like ``param`` or a :class:`GradTable`
    (only the parameters it covers are updated).  ``validate_args``: check every argument first (one-line
    errors); :class:`subgrad.optim.SGD` passes False (it validated its settings at construction).
    Returns ``param``.
    """
    if validate_args:
        check_nonnegative(
            lr=0.0 if isinstance(lr, torch.Tensor) else lr,
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            l1=l1,
        )
        if nesterov and (momentum == 0.0 or dampening != 0.0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        check_contiguous("param", param)
        if not isinstance(grad, GradTable):
            check_same_layout("grad", grad, param, "param")
        if momentum != 0.0:
            if momentum_buffer is None:
                raise ValueError("momentum != 0 needs a momentum_buffer like param")
            check_same_layout("momentum_buffer", momentum_buffer, param, "param")
    if validate_args and param.dtype != torch.float64:
        check_float_dtype("param", param)
    sgd_launcher(
        param,
        grad,
        momentum_buffer,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        first_step=first_step,
        l1=l1,
        backend=backend,
    )()
    return param


def sgd_launcher(
    param: torch.Tensor,
    grad: torch.Tensor | GradTable,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    l1: float,
    backend: str | None,
) -> Callable[[], None]:
    """:func:`sgd_step_` (arguments unchecked) prepared once: backend, scalars, grid and constexprs are
    settled here; each call of the returned function is one step (an optimizer keeps it between steps
    while the hyperparameters stay the same).  A tensor ``lr`` is read at each call (the kernel reads
    it from memory; the twin reads its value)."""
    table = grad if isinstance(grad, GradTable) else None
    flat_grad = table.like if table else grad
    if float64_twin(backend, param, flat_grad, momentum_buffer if momentum != 0.0 else None):
        scalars = (float(weight_decay), float(l1), float(momentum), 1.0 - dampening, maximize, first_step, nesterov)

        def float64_step():
            rate = float(lr.reshape(())) if isinstance(lr, torch.Tensor) else float(lr)
            for where, g in twin_views(grad):
                buf = momentum_buffer[where] if momentum_buffer is not None else None
                sgd_torch(param[where], g, buf, rate, *scalars, compute=torch.float64, grad_writable=table is not None)

        return float64_step
    lr_tensor = device_scalar("lr", lr, param)
    weight_decay, l1, momentum = f32(weight_decay), f32(l1), f32(momentum)
    one_minus_dampening = f32(1.0 - dampening)
    if resolve_backend(backend, param, flat_grad) != "triton":
        scalars = (weight_decay, l1, momentum, one_minus_dampening, maximize, first_step, nesterov)

        def twin_step():
            rate = host_scalar(lr)
            for where, g in twin_views(grad):
                buf = momentum_buffer[where] if momentum_buffer is not None else None
                sgd_torch(param[where], g, buf, rate, *scalars, grad_writable=table is not None)

        return twin_step
    n = table.numel if table else param.numel()
    tiles = table.tiles() if table else param
    args = (
        momentum_buffer if momentum_buffer is not None else param,
        lr_tensor if lr_tensor is not None else param,
        tiles,
        n,
        0.0 if lr_tensor is not None else f32(lr),
        weight_decay,
        l1,
        momentum,
        one_minus_dampening,
    )
    constexprs = dict(
        MAXIMIZE=maximize,
        HAS_WEIGHT_DECAY=weight_decay != 0.0,
        HAS_L1=l1 != 0.0,
        HAS_MOMENTUM=momentum != 0.0,
        FIRST_STEP=first_step,
        NESTEROV=nesterov,
        LR_IN_MEMORY=lr_tensor is not None,
        GRAD_TABLE=table is not None,
        TILE_SIZE=TILE_SIZE,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    programs = (len(tiles),) if table else grid(n)

    if stale_copy(lr_tensor, lr):

        def kernel_step():  # lr converted to float32 at each call: the kernel must see its current value
            if n:
                lr_now = device_scalar("lr", lr, param)
                grads = table.addresses() if table else grad
                sgd_kernel[programs](param, grads, args[0], lr_now, *args[2:], **constexprs)

        return kernel_step

    def kernel_step():
        if n:  # the module's kernel looked up at each call, so subgrad.testing's recorder sees it
            sgd_kernel[programs](param, table.addresses() if table else grad, *args, **constexprs)

    return kernel_step
