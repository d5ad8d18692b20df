"""AdamW's per-step scalars computed on the device (``beta ** step`` by squaring, betas to 48 bits) with
their host twins, and :func:`adamw_step_`'s argument rules: the parts of ``adamw.py`` that are not the
update itself."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    TILE_SIZE,
    check_contiguous,
    check_float_dtype,
    check_gate,
    check_nonnegative,
    check_same_layout,
    device_scalar,
    f32,
    require,
)
from .grad_table import GradTable

#: ``beta ** step`` by squaring covers steps below 2**STEP_BITS (a float32 step count stops at 2**24).
STEP_BITS = 24
#: elements per program of the device-scalars variant
DEVICE_SCALARS_TILE = 4 * TILE_SIZE
STEP_BITS_TL: tl.constexpr = tl.constexpr(STEP_BITS)


@triton.jit
def power(base, exponent):
    """``base ** exponent`` in float64 for an int32 ``exponent`` in [0, 2**STEP_BITS), by repeated squaring:
    a fixed sequence of IEEE multiplications, repeated exactly by :func:`power_torch`."""
    result = tl.full([], 1.0, tl.float64)
    for i in tl.static_range(STEP_BITS_TL):
        result = tl.where(((exponent >> i) & 1) != 0, result * base, result)
        base = base * base
    return result


def power_torch(base: float, exponent: int) -> float:
    """Twin of :func:`power` (Python floats are IEEE float64)."""
    result = 1.0
    for i in range(STEP_BITS):
        if (exponent >> i) & 1:
            result = result * base
        base = base * base
    return result


def split_f64(value: float) -> tuple[float, float]:
    """``value`` as two float32 numbers whose float64 sum keeps 48 bits of it: 1 - beta2 ** step cancels
    (beta2 = 0.999 loses three digits), so a float32 beta would put 1e-5 relative error into the step."""
    high = f32(value)
    return high, f32(value - high)


def device_scalars(lr: float, step: int, weight_decay: float, beta1: float, beta2: float) -> dict:
    """The twin of the kernel's DEVICE_SCALARS branch: the same float64 operations on the same inputs."""
    bias_correction1 = 1.0 - power_torch(sum(split_f64(beta1)), step)
    bias_correction2 = 1.0 - power_torch(sum(split_f64(beta2)), step)
    return dict(
        step_size=f32(lr / bias_correction1),
        bias_correction2_sqrt=f32(math.sqrt(bias_correction2)),
        decay=f32(1.0 - lr * weight_decay),
    )


def check_adamw_args(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    l1,
    gate,
    **_unchecked,
) -> None:
    """:func:`adamw_step_`'s argument rules, each with a one-line error (called with its arguments:
    ``check_adamw_args(**locals())``)."""
    check_nonnegative(lr=0.0 if isinstance(lr, torch.Tensor) else lr, eps=eps, weight_decay=weight_decay, l1=l1)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        require(name, isinstance(beta, (int, float)) and 0.0 <= beta < 1.0, "a number in [0, 1)", beta)
    check_contiguous("param", param)
    grad = grad.like if isinstance(grad, GradTable) else grad
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_same_layout(name, t, param, "param")
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs a max_exp_avg_sq buffer like param")
        check_same_layout("max_exp_avg_sq", max_exp_avg_sq, param, "param")
        if max_exp_avg_sq.dtype != exp_avg_sq.dtype:
            raise ValueError("max_exp_avg_sq must have the dtype of exp_avg_sq")
    if isinstance(step, torch.Tensor):  # a float32 count (torch.optim's capturable step) or an int64 counter
        if step.numel() != 1 or step.dtype not in (torch.float32, torch.int64) or step.device != param.device:
            raise ValueError(
                f"a tensor step must be one float32 or int64 value on {param.device}, got "
                f"{step.dtype} {tuple(step.shape)} on {step.device}"
            )
    elif step < 1:
        raise ValueError(f"step counts from 1 (this step included), got {step}")
    check_gate(gate, param)
    device_scalar("lr", lr, param)
    if param.dtype != torch.float64:
        check_float_dtype("param", param)
