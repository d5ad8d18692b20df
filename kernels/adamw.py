"""Fused AdamW step with ``torch.optim.AdamW`` semantics, one launch per flat buffer.

    g = -grad if maximize else grad
    g = g + l1 * sign(w)                                   (if l1 != 0; an extension, subgradient of l1 |w|)
    w = w * (1 - lr * weight_decay)                        (decoupled weight decay)
    m = m + (1 - beta1) * (g - m)                          (torch: exp_avg.lerp_(g, 1 - beta1))
    v = v * beta2 + (1 - beta2) * g * g
    v_hat = max(v_max, v) -> v_max   (amsgrad)   else v
    w = w - step_size * m / (sqrt(v_hat) / sqrt(bias_correction2) + eps)
    step_size = lr / bias_correction1,   bias_correction_k = 1 - beta_k ** step

The bias corrections are computed on the host from the (host) step counter, as ``torch.optim`` does
without ``capturable``, so a step never synchronises with the device.  Parameters, gradients and the
moments may be float32, bfloat16 or float16; arithmetic is float32.  float64 buffers are updated by
the torch twin in float64 (as torch.optim does), on any device.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_SIZE, NUM_WARPS, check_contiguous, check_float_dtype, check_same_layout, chunks,
                      f32, float64_twin, grid, resolve_backend, round_to, sign, sqrt_rn_torch)


@triton.jit
def adamw_kernel(
    param_ptr,  # *float [n]: parameters, updated in place
    grad_ptr,  # *float [n]: gradients (read only)
    exp_avg_ptr,  # *float [n]: first moment m
    exp_avg_sq_ptr,  # *float [n]: second moment v
    max_exp_avg_sq_ptr,  # *float [n]: running max of v when AMSGRAD (else unused)
    n,  # number of elements
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
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    pos = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = pos < n
    w = tl.load(param_ptr + pos, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + pos, mask=mask).to(tl.float32)
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


def adamw_torch(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, decay, one_minus_beta1, beta2,
                one_minus_beta2, step_size, bias_correction2_sqrt, eps, l1, maximize, amsgrad,
                compute=torch.float32) -> None:
    """Torch twin of :func:`adamw_kernel` (cache-sized chunks of the flat buffers); ``compute=float64``
    is the float64 path."""
    param, grad, exp_avg, exp_avg_sq = (t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq))
    # A divisor on the tensors' device: CUDA torch turns division by a CPU scalar into multiplication by
    # its reciprocal (up to 1 ulp off IEEE division; seen on an H200 before this), the kernel divides.
    bias_correction2_sqrt = torch.tensor(bias_correction2_sqrt, dtype=compute, device=param.device)
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


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                max_exp_avg_sq: torch.Tensor | None = None, *, step: int, lr: float, beta1: float = 0.9,
                beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                maximize: bool = False, l1: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """One fused AdamW step on a contiguous buffer; ``step`` counts from 1 and includes this step.

    Hyperparameters are validated by the optimizer (``subgrad.optim``), not here.  Returns ``param``.
    """
    check_contiguous("param", param)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_same_layout(name, t, param, "param")
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs a max_exp_avg_sq buffer like param")
        check_same_layout("max_exp_avg_sq", max_exp_avg_sq, param, "param")
        if max_exp_avg_sq.dtype != exp_avg_sq.dtype:
            raise ValueError("max_exp_avg_sq must have the dtype of exp_avg_sq")
    if step < 1:
        raise ValueError(f"step counts from 1 (this step included), got {step}")
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    if float64_twin(backend, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None):
        adamw_torch(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, 1.0 - lr * weight_decay, 1.0 - beta1,
                    float(beta2), 1.0 - beta2, lr / bias_correction1, math.sqrt(bias_correction2), float(eps),
                    float(l1), maximize, amsgrad, compute=torch.float64)
        return param
    check_float_dtype("param", param)
    # Host-side scalars in float64, rounded once to float32 (torch.optim computes them the same way).
    scalars = dict(decay=f32(1.0 - lr * weight_decay), one_minus_beta1=f32(1.0 - beta1), beta2=f32(beta2),
                   one_minus_beta2=f32(1.0 - beta2), step_size=f32(lr / bias_correction1),
                   bias_correction2_sqrt=f32(math.sqrt(bias_correction2)), eps=f32(eps), l1=f32(l1))
    if resolve_backend(backend, param, grad) == "triton":
        n = param.numel()
        if n:
            adamw_kernel[grid(n)](param, grad, exp_avg, exp_avg_sq,
                                  max_exp_avg_sq if max_exp_avg_sq is not None else exp_avg_sq, n, **scalars,
                                  MAXIMIZE=maximize, AMSGRAD=amsgrad, HAS_L1=l1 != 0.0, BLOCK_SIZE=BLOCK_SIZE,
                                  num_warps=NUM_WARPS, enable_fp_fusion=False)
    else:
        adamw_torch(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, maximize=maximize, amsgrad=amsgrad,
                    **scalars)
    return param
