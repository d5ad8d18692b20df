"""Fused AdamW step with ``torch.optim.AdamW`` semantics, one launch per flat buffer.

    g = -grad if maximize else grad
    g = g + l1 * sign(w)                                   (if l1 != 0; an extension, subgradient of l1 |w|)
    w = w * (1 - lr * weight_decay)                        (decoupled weight decay)
    m = m + (1 - beta1) * (g - m)                          (torch: exp_avg.lerp_(g, 1 - beta1))
    v = v * beta2 + (1 - beta2) * g * g
    v_hat = max(v_max, v) -> v_max   (amsgrad)   else v
    w = w - step_size * m / (sqrt(v_hat) / sqrt(bias_correction2) + eps)
    step_size = lr / bias_correction1,   bias_correction_k = 1 - beta_k ** step

Where the per-step scalars come from:

* host (``step`` an int, ``lr`` a number): ``decay``, ``step_size`` and ``sqrt(bias_correction2)`` are computed
  in float64 on the host and rounded once to float32, as ``torch.optim`` does without ``capturable``;
* device (``step`` or ``lr`` a tensor, as ``capturable=True`` keeps them): every program computes them in
  float64 from the float32 ``lr`` and ``weight_decay``, the betas to 48 bits (two float32 halves,
  :func:`split_f64`) and the step it reads, with ``beta ** step`` by repeated squaring (:func:`power`, IEEE
  multiplications the twin repeats exactly), so the launch takes no per-step host value and replays (CUDA
  graphs).  The two paths agree to about one float32 rounding of each scalar.

An optional ``gate`` (a bool on the device) makes the step a no-op where it is False: every store is
masked off, so a skipped step is decided on the device.  Parameters, gradients and the moments may be
float32, bfloat16 or float16; arithmetic is float32.  float64 buffers are updated by the torch twin in
float64 (as torch.optim does), on any device.  ``grad`` is a flat buffer like ``param`` or a
:class:`GradTable` of the gradients where backward left them (grad_table.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import (
    INPLACE_CHUNK,
    NUM_WARPS,
    TILE_SIZE,
    chunks,
    device_scalar,
    f32,
    float64_twin,
    gate_open,
    host_scalar,
    resolve_backend,
    round_to,
    sign,
    sqrt_rn_torch,
    stale_copy,
    workspace,
)
from .adamw_scalars import DEVICE_SCALARS_TILE, check_adamw_args, device_scalars, power, split_f64
from .grad_table import GradTable, tile_positions, twin_views


@triton.jit(do_not_specialize=["step"])
def adamw_kernel(
    param_ptr,  # *float [n]: parameters, updated in place
    grad_ptr,  # *float [n]: gradients (read only); with GRAD_TABLE: *int64 [parameters], their addresses
    exp_avg_ptr,  # *float [n]: first moment m
    exp_avg_sq_ptr,  # *float [n]: second moment v
    max_exp_avg_sq_ptr,  # *float [n]: running max of v when AMSGRAD (else unused)
    lr_ptr,  # *fp32 [1]: learning rate when LR_IN_MEMORY (else unused)
    step_ptr,  # *fp32 or *int64 [1]: the step count, this step included, when STEP_IN_MEMORY (else unused)
    gate_ptr,  # *bool [1]: when HAS_GATE, False leaves every buffer as it was (a skipped step)
    tiles_ptr,  # *int64 [programs, 4]: with GRAD_TABLE, each program's tile (grad_table.py; else unused)
    counter_ptr,  # *int32 [1]: with ADVANCE_STEPS, programs finished (the last one re-arms it to 0)
    counts_ptr,  # *fp32 [num_counts]: with ADVANCE_STEPS, step counts to advance (step_ptr is one of them)
    increments_ptr,  # *fp32 [num_counts]: with HAS_INCREMENTS, 1 where a count advances, 0 where not
    num_counts,  # length of counts_ptr
    n,  # number of elements (without GRAD_TABLE)
    lr,  # fp32 learning rate (DEVICE_SCALARS without LR_IN_MEMORY)
    step,  # int32 step count (DEVICE_SCALARS without STEP_IN_MEMORY)
    weight_decay,  # fp32 decoupled weight decay (DEVICE_SCALARS)
    beta1,  # fp32 beta1 rounded (DEVICE_SCALARS); beta1 = beta1 + beta1_low to 48 bits
    beta1_low,  # fp32 beta1 - beta1 rounded (DEVICE_SCALARS)
    beta2_low,  # fp32 beta2 - beta2 rounded (DEVICE_SCALARS)
    decay,  # fp32 (1 - lr * weight_decay)
    one_minus_beta1,  # fp32 (1 - beta1)
    beta2,  # fp32 beta2
    one_minus_beta2,  # fp32 (1 - beta2)
    step_size,  # fp32 lr / (1 - beta1 ** step)
    bias_correction2_sqrt,  # fp32 sqrt(1 - beta2 ** step)
    eps,  # fp32 term added to the denominator
    l1,  # fp32 L1 coefficient (subgradient l1 * sign(w) added to the gradient)
    MAXIMIZE: tl.constexpr,  # ascend instead of descend
    AMSGRAD: tl.constexpr,  # use the running max of v
    HAS_L1: tl.constexpr,  # l1 != 0
    DEVICE_SCALARS: tl.constexpr,  # compute decay, step_size and bias_correction2_sqrt here (module docstring)
    LR_IN_MEMORY: tl.constexpr,  # read lr from lr_ptr
    STEP_IN_MEMORY: tl.constexpr,  # read the step from step_ptr
    HAS_GATE: tl.constexpr,  # read the apply flag from gate_ptr
    GRAD_TABLE: tl.constexpr,  # gradients through an address table, programs through a tile table
    ADVANCE_STEPS: tl.constexpr,  # step_ptr holds the count before this step; advance counts_ptr (+gate)
    HAS_INCREMENTS: tl.constexpr,  # advance only where increments_ptr is 1 (else every count)
    TILE_SIZE: tl.constexpr,  # elements per program
):
    pos, mask, grad_at = tile_positions(tiles_ptr, grad_ptr, param_ptr, n, GRAD_TABLE, TILE_SIZE)
    if HAS_GATE:
        mask = mask & (tl.load(gate_ptr) != 0)  # a closed gate: no element is stored
    if DEVICE_SCALARS:
        if LR_IN_MEMORY:
            lr = tl.load(lr_ptr)
        if STEP_IN_MEMORY:
            step = tl.load(step_ptr).to(tl.int32)
            if ADVANCE_STEPS:
                step = step + 1
        lr64 = tl.cast(lr, tl.float64)
        bias_correction1 = 1.0 - power(tl.cast(beta1, tl.float64) + tl.cast(beta1_low, tl.float64), step)
        bias_correction2 = 1.0 - power(tl.cast(beta2, tl.float64) + tl.cast(beta2_low, tl.float64), step)
        # float64 division and root are IEEE round-to-nearest on every target (no approximate forms exist)
        step_size = (lr64 / bias_correction1).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
        decay = (1.0 - lr64 * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    w = tl.load(param_ptr + pos, mask=mask).to(tl.float32)
    g = tl.load(grad_at, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + pos, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + pos, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_L1:
        g = g + l1 * sign(w)
    w = w * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    m = round_to(m, exp_avg_ptr.dtype.element_ty)  # the step uses the stored moments, as torch does
    v = round_to(v, exp_avg_sq_ptr.dtype.element_ty)
    tl.store(exp_avg_ptr + pos, m, mask=mask)
    tl.store(exp_avg_sq_ptr + pos, v, mask=mask)
    v = v.to(tl.float32)
    if AMSGRAD:  # compared in float32 (exact: both values are representable in the stored dtype)
        v = tl.maximum(tl.load(max_exp_avg_sq_ptr + pos, mask=mask).to(tl.float32), v)
        tl.store(max_exp_avg_sq_ptr + pos, v.to(max_exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w - step_size * tl.math.div_rn(m.to(tl.float32), denom)
    tl.store(param_ptr + pos, round_to(w, param_ptr.dtype.element_ty), mask=mask)
    if ADVANCE_STEPS:
        advance_counts(counter_ptr, counts_ptr, increments_ptr, num_counts, gate_ptr, HAS_GATE, HAS_INCREMENTS)


@triton.jit
def advance_counts(counter_ptr, counts_ptr, increments_ptr, num_counts, gate_ptr, HAS_GATE, HAS_INCREMENTS):
    """The step counts advance (by the gate: 1 or 0) once every program has read them: each program takes
    a ticket after its reads (acquire-release), and the one holding the last ticket writes and re-arms the
    counter, so a replayed launch starts from 0 again."""
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        by = 1.0
        if HAS_GATE:
            by = (tl.load(gate_ptr) != 0).to(tl.float32)
        for start in range(0, num_counts, 128):
            offs = start + tl.arange(0, 128)
            inside = offs < num_counts
            increment = by
            if HAS_INCREMENTS:
                increment = tl.load(increments_ptr + offs, mask=inside, other=0.0) * by
            counts = tl.load(counts_ptr + offs, mask=inside)
            tl.store(counts_ptr + offs, counts + increment, mask=inside)
        tl.atomic_xchg(counter_ptr, 0)


def adamw_torch(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    step_size,
    bias_correction2_sqrt,
    eps,
    l1,
    maximize,
    amsgrad,
    compute=torch.float32,
) -> None:
    """Torch twin of :func:`adamw_kernel` (cache-sized chunks of the flat buffers); ``compute=float64``
    is the float64 path.  Buffers already in the compute dtype take :func:`_adamw_in_place`."""
    param, grad, exp_avg, exp_avg_sq = (t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq))
    # A divisor on the tensors' device: CUDA torch turns division by a CPU scalar into multiplication by
    # its reciprocal (up to 1 ulp off IEEE division; seen on an H200 before this), the kernel divides.
    bias_correction2_sqrt = torch.tensor(bias_correction2_sqrt, dtype=compute, device=param.device)
    dtypes = {param.dtype, grad.dtype, exp_avg.dtype, exp_avg_sq.dtype, max_exp_avg_sq.dtype if amsgrad else compute}
    if dtypes == {compute}:
        vmax = max_exp_avg_sq.view(-1) if amsgrad else None
        scalars = (decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, l1)
        _adamw_in_place(param, grad, exp_avg, exp_avg_sq, vmax, *scalars, maximize)
        return
    for a, b in chunks(param.numel()):
        w = param[a:b].to(compute)
        g = grad[a:b].to(compute)
        m = exp_avg[a:b].to(compute)
        v = exp_avg_sq[a:b].to(compute)
        if maximize:
            g = -g
        if l1 != 0.0:
            g = g + torch.sign(w) * l1
        w = w * decay
        m = (m + (g - m) * one_minus_beta1).to(exp_avg.dtype)
        v = (v * beta2 + (g * g) * one_minus_beta2).to(exp_avg_sq.dtype)
        exp_avg[a:b] = m
        exp_avg_sq[a:b] = v
        v = v.to(compute)
        if amsgrad:
            vmax = max_exp_avg_sq.view(-1)[a:b]
            v = torch.maximum(vmax.to(compute), v)
            vmax.copy_(v.to(vmax.dtype))
        denom = sqrt_rn_torch(v) / bias_correction2_sqrt + eps
        param[a:b] = (w - (m.to(compute) / denom) * step_size).to(param.dtype)


def _adamw_in_place(
    param, grad, m_all, v_all, vmax_all, decay, omb1, beta2, omb2, step_size, bc2_sqrt, eps, l1, maximize
):
    """:func:`adamw_torch` when every buffer is in the compute dtype: the same operations in the same
    order, each written into the buffers or a kept workspace (``out=``) rather than a fresh tensor."""
    n, dtype, device = param.numel(), param.dtype, param.device
    for a, b in chunks(n, INPLACE_CHUNK):
        w, g, m, v = param[a:b], grad[a:b], m_all[a:b], v_all[a:b]
        g_new, tmp = workspace(2, b - a, dtype, device)
        if maximize or l1 != 0.0:
            g = torch.neg(g, out=g_new) if maximize else g_new.copy_(g)
            if l1 != 0.0:
                g.add_(torch.sign(w, out=tmp).mul_(l1))
        w.mul_(decay)
        m.add_(torch.sub(g, m, out=tmp).mul_(omb1))
        v.mul_(beta2).add_(torch.mul(g, g, out=tmp).mul_(omb2))
        if vmax_all is not None:
            v = torch.maximum(vmax_all[a:b], v, out=vmax_all[a:b])
        if dtype == torch.float64:
            denom = torch.sqrt(v, out=tmp)
        else:  # sqrt_rn_torch: the float64 root rounded once
            (root,) = workspace(1, b - a, torch.float64, device)
            denom = tmp.copy_(root.copy_(v).sqrt_())
        denom.div_(bc2_sqrt).add_(eps)
        w.sub_(torch.div(m, denom, out=tmp).mul_(step_size))


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor | GradTable,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None = None,
    *,
    step: int | torch.Tensor,
    lr: float | torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    l1: float = 0.0,
    gate: torch.Tensor | None = None,
    backend: str | None = None,
    validate_args: bool = True,
) -> torch.Tensor:
    """One fused AdamW step on a contiguous buffer; ``step`` counts from 1 and includes this step.

    ``step`` and ``lr`` are numbers (host scalars) or 1-element tensors on the device that the kernel reads
    (device scalars; see the module docstring).  ``gate``: an optional bool on the device; False skips the
    step on the device.  ``validate_args``: check every argument first (one-line errors); the optimizers
    pass False (they validated their settings at construction).
    Returns ``param``.
    """
    if validate_args:
        check_adamw_args(**locals())
    adamw_launcher(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        l1=l1,
        gate=gate,
        backend=backend,
    )(step if isinstance(step, int) else None)
    return param


def adamw_launcher(
    param: torch.Tensor,
    grad: torch.Tensor | GradTable,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    step: int | torch.Tensor,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    l1: float,
    gate: torch.Tensor | None,
    backend: str | None,
    advance: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> Callable[[int | None], None]:
    """:func:`adamw_step_` (arguments unchecked) prepared once; each call of the returned function is one
    step.  It takes this step's count when ``step`` is a host number (None: ``step`` as given here); a
    tensor ``step`` / ``lr`` is read at each call (by the kernel from memory, or by the twin).

    ``advance``: ``(counts, increments, tickets)``, float32 step counts on the device of which the tensor
    ``step`` is one, None or 0/1 per count, and one int32 zero on the device (the kernel's ticket counter,
    kept by the caller): each call first advances the counts by the gate (1 without one), where
    ``increments`` is 1 (everywhere without it); the kernel does it in the same launch (its last program,
    after every program read ``step``), so a capturable step is one launch."""
    on_device = isinstance(step, torch.Tensor) or isinstance(lr, torch.Tensor)
    if advance is not None and not isinstance(step, torch.Tensor):
        raise ValueError("advance= needs the step as a tensor (one of the counts it advances)")

    def advance_counts_torch():  # what the kernel's last program does, for the twins
        counts, increments, _ = advance
        by = gate if gate is not None else 1
        counts.add_(by if increments is None else increments if gate is None else increments * gate)

    table = grad if isinstance(grad, GradTable) else None
    flat_grad = table.like if table else grad
    if float64_twin(backend, param, flat_grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None):

        def float64_step(count=None):
            if advance is not None:
                advance_counts_torch()
            if not gate_open(gate):
                return
            rate = float(host_scalar(lr)) if isinstance(lr, torch.Tensor) else float(lr)
            t = int(host_scalar(step)) if isinstance(step, torch.Tensor) else count or step
            scalars = dict(decay=1.0 - rate * weight_decay, step_size=rate / (1.0 - beta1**t))
            scalars.update(bias_correction2_sqrt=math.sqrt(1.0 - beta2**t), one_minus_beta1=1.0 - beta1)
            scalars.update(beta2=float(beta2), one_minus_beta2=1.0 - beta2, eps=float(eps), l1=float(l1))
            for where, g in twin_views(grad):
                vmax = max_exp_avg_sq[where] if amsgrad else None
                buffers = (param[where], g, exp_avg[where], exp_avg_sq[where], vmax)
                adamw_torch(*buffers, maximize=maximize, amsgrad=amsgrad, compute=torch.float64, **scalars)

        return float64_step
    lr_tensor = device_scalar("lr", lr, param)
    step_tensor = step.reshape(1) if isinstance(step, torch.Tensor) else None
    constants = dict(
        one_minus_beta1=f32(1.0 - beta1), beta2=f32(beta2), one_minus_beta2=f32(1.0 - beta2), eps=f32(eps), l1=f32(l1)
    )

    def host_scalars(t: int) -> dict:  # in float64, rounded once to float32 (as torch.optim computes them)
        return dict(
            decay=f32(1.0 - lr * weight_decay),
            step_size=f32(lr / (1.0 - beta1**t)),
            bias_correction2_sqrt=f32(math.sqrt(1.0 - beta2**t)),
        )

    if resolve_backend(backend, param, flat_grad) != "triton":

        def twin_step(count=None):
            if advance is not None:
                advance_counts_torch()
            if not gate_open(gate):
                return  # the twin of a closed gate (its step count may be 0: no scalars to compute)
            if on_device:
                t = int(host_scalar(step)) if step_tensor is not None else count or step
                per_step = device_scalars(host_scalar(lr), t, f32(weight_decay), beta1, beta2)
            else:
                per_step = host_scalars(count or step)
            for where, g in twin_views(grad):
                vmax = max_exp_avg_sq[where] if amsgrad else None
                adamw_torch(
                    param[where],
                    g,
                    exp_avg[where],
                    exp_avg_sq[where],
                    vmax,
                    maximize=maximize,
                    amsgrad=amsgrad,
                    **per_step,
                    **constants,
                )

        return twin_step
    n = table.numel if table else param.numel()
    # device scalars: every thread computes them (~40 float64 instructions), so a program takes 4x the
    # elements to spread that over 32 per thread (benchmarks/compiled_cost.py: memory bound).  Not through
    # a table: its unaligned, unvectorised loads then hold 32 values per array per thread, which spilled
    # (255 registers and a stack frame on sm_90; 2x the elements still took 190 registers)
    tile = DEVICE_SCALARS_TILE if on_device and table is None else TILE_SIZE
    tiles = table.tiles(tile) if table else param
    programs = (len(tiles),) if table else (triton.cdiv(n, tile),)
    buffers = (
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq if max_exp_avg_sq is not None else exp_avg_sq,
        lr_tensor if lr_tensor is not None else param,
        step_tensor if step_tensor is not None else param,
        gate if gate is not None else param,
        tiles,
        advance[2] if advance is not None else param,
        advance[0] if advance is not None else param,
        advance[1] if advance is not None and advance[1] is not None else param,
        advance[0].numel() if advance is not None else 0,
        n,
    )
    betas = (f32(weight_decay), *split_f64(beta1), split_f64(beta2)[1])
    constexprs = dict(
        MAXIMIZE=maximize,
        AMSGRAD=amsgrad,
        HAS_L1=l1 != 0.0,
        DEVICE_SCALARS=on_device,
        LR_IN_MEMORY=lr_tensor is not None,
        STEP_IN_MEMORY=step_tensor is not None,
        HAS_GATE=gate is not None,
        GRAD_TABLE=table is not None,
        ADVANCE_STEPS=advance is not None,
        HAS_INCREMENTS=advance is not None and advance[1] is not None,
        TILE_SIZE=tile,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
        **constants,
    )
    fresh_lr = stale_copy(lr_tensor, lr)
    device_step = dict(decay=0.0, step_size=0.0, bias_correction2_sqrt=0.0)  # every program computes them

    def kernel_step(count=None):
        if not n:
            if advance is not None:
                advance_counts_torch()  # nothing to update, but the counts still advance
            return
        t = 0 if step_tensor is not None else count or step  # a step in memory: a replayable launch
        scalars = (f32(lr) if lr_tensor is None else 0.0, t) if on_device else (0.0, 0)
        found = buffers if not fresh_lr else (*buffers[:3], device_scalar("lr", lr, param), *buffers[4:])
        adamw_kernel[programs](
            param,
            table.addresses() if table else grad,
            *found,
            *scalars,
            *betas,
            **(device_step if on_device else host_scalars(t)),
            **constexprs,
        )

    return kernel_step
