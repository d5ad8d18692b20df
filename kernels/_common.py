"""Shared plumbing for every kernel module: backend choice, scalar rounding, launch shape.

Each op module (``philox.py``, ``perturb.py``, ``zo_update.py``, ``sgd.py``, ``adamw.py``) holds
its ``@triton.jit`` kernel, a plain launcher, and a pure-torch twin with the same signature and
the same numbers.  This file holds only what all of them share.

Why the twins give the *same bits* as the kernels
-------------------------------------------------
* Every kernel launches with ``enable_fp_fusion=False``: the compiler may not contract ``a * b + c``
  into one FMA, so each ``*`` and ``+`` rounds once, exactly as the separate torch ops of the twin do.
* Division and square root use ``tl.math.div_rn`` / ``tl.sqrt_rn`` (IEEE round-to-nearest), which is
  what torch computes on CPU and CUDA; ``tl.sqrt`` and ``/`` are approximate on NVIDIA GPUs.
* Python-float hyperparameters reach a kernel as float32; :func:`f32` rounds them the same way on
  the host so the twin multiplies by the identical value.
* The twins never use ``alpha=`` / ``addcmul`` / ``lerp`` forms, which ATen may evaluate with FMA.
* Stores round float32 to bfloat16 with :func:`round_to` (explicit round-to-nearest-even): Triton's
  interpreter truncates on ``.to(tl.bfloat16)`` while GPUs and torch round to nearest even.
* ``torch.sqrt`` on CPU float32 is not correctly rounded; the twins use :func:`sqrt_rn_torch`.
* CUDA torch divides by a CPU scalar (a Python float or 0-dim CPU tensor) as multiplication by its
  reciprocal; twins divide only by tensors on their own device.
* On CPU the normal-direction twin runs compiled by ``torch.compile`` (philox.py, ``normal_pairs``): Inductor
  builds C++ with ``-ffp-contract=off`` and without unsafe math, and the compiled program must reproduce the
  eager twin bit for bit on a probe before it is used; otherwise the eager twin runs.
The kernels are memory bound, so giving up FMA costs nothing measurable (see ``benchmarks/kernels.py``).
"""

from __future__ import annotations

import math
import os
import struct
import threading

import torch
import triton
import triton.language as tl

BACKENDS = ("triton", "torch")

#: Elements handled by one Triton program.  No autotuning: the kernels update buffers in place and
#: an autotuner would run them several times on the same data; a 1024-wide block with 4 warps is
#: within a few percent of the best configuration for bandwidth-bound elementwise kernels.
TILE_SIZE = 1024
NUM_WARPS = 4

#: Elements of one direction are addressed with 32-bit indices (Philox counters are element // 8 or
#: element // 128, see philox.py); ``offset + n`` must therefore stay within 2**32 elements per seed.
MAX_DIRECTION_ELEMENTS = 2**32

#: Seeds are passed to kernels as two non-negative int32 halves so that every seed gives the same
#: kernel signature (no recompiles); the full seed is ``hi << 31 | lo``.
MAX_SEED = 2**62


#: Bumped whenever the way kernels launch changes (subgrad.testing's recorder patches the kernels and
#: ``resolve_backend``): a launcher prepared before (``sgd_launcher``, ``adamw_launcher``) is stale then.
launch_epoch = 0


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Pick ``"triton"`` or ``"torch"``.

    Explicit ``backend`` wins; otherwise the environment variable ``SUBGRAD_BACKEND`` (so tests can
    force Triton under ``TRITON_INTERPRET=1`` on CPU); otherwise Triton for CUDA tensors and the
    torch twin for everything else.
    """
    choice = backend if backend is not None else os.environ.get("SUBGRAD_BACKEND") or None
    if choice is None:
        return "triton" if tensors and all(t.is_cuda for t in tensors) else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (auto), got {choice!r}")
    if choice == "triton":
        for t in tensors:
            if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(
                    f"backend='triton' needs CUDA tensors (got a tensor on {t.device}); "
                    "set TRITON_INTERPRET=1 before importing subgrad to run Triton on the CPU"
                )
    return choice


def f32(value: float) -> float:
    """Round a Python float to the nearest float32, as a Triton kernel argument is rounded."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def device_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor | None:
    """A hyperparameter that a kernel reads from memory: a 1-element tensor as float32 on ``like``'s device
    (the kernel loads it, so no host read and a replayed launch sees its current value); None for a
    number, which travels as a launch argument."""
    if not isinstance(value, torch.Tensor):
        return None
    if value.numel() != 1 or not value.is_floating_point() or value.device != like.device:
        raise ValueError(
            f"a tensor {name} must be one floating-point value on {like.device}, got "
            f"{value.dtype} {tuple(value.shape)} on {value.device}"
        )
    return value.reshape(1).to(torch.float32)


def stale_copy(scalar: torch.Tensor | None, value) -> bool:
    """Whether :func:`device_scalar` returned a converted copy of ``value`` (not float32): a launcher
    prepared once must then convert it again at each call to see its current value."""
    return scalar is not None and value.dtype != torch.float32


def require(name: str, ok: bool, expected: str, value) -> None:
    """The one check style of subgrad's public boundaries: ``name must be <expected>, got <value>``."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_nonnegative(**values) -> None:
    """Each of ``values`` (a hyperparameter that travels as a number) is finite and >= 0."""
    for name, value in values.items():
        require(
            name, isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, "a finite number >= 0", value
        )


def check_gate(gate: torch.Tensor | None, like: torch.Tensor) -> None:
    """A skip gate is one bool on the kernel's device (None: no gate)."""
    if gate is not None and (gate.dtype != torch.bool or gate.numel() != 1 or gate.device != like.device):
        raise ValueError(
            f"gate must be one bool on {like.device}, got {gate.dtype} {tuple(gate.shape)} on {gate.device}"
        )


def gate_open(gate: torch.Tensor | None) -> bool:
    """What a twin reads of a gate (on the host: twins run on the CPU, where that is no synchronisation)."""
    return gate is None or bool(gate.reshape(()))


def host_scalar(value) -> float:
    """What a twin computes with: the float32 value of a number or of a 1-element tensor (read on the
    host: twins run on the CPU, where that is no synchronisation)."""
    return f32(value.item() if isinstance(value, torch.Tensor) else value)


def split_seed(seed: int) -> tuple[int, int]:
    """Check a seed and split it into the (lo, hi) 31-bit halves that kernels take."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**62), got {seed}")
    return seed & (2**31 - 1), seed >> 31


def check_direction_range(offset: int, n: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + n > MAX_DIRECTION_ELEMENTS:
        raise ValueError(
            f"offset + n = {offset + n} exceeds the 2**32 elements one seed can index; "
            "split the buffer and give each part its own seed"
        )


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (got strides {tuple(t.stride())}); use subgrad.FlatParams or call .contiguous()"
        )


def check_same_layout(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "x") -> None:
    if t.numel() != ref.numel() or t.device != ref.device:
        raise ValueError(
            f"{name} must have as many elements as {ref_name} on the same device "
            f"(got {t.numel()} on {t.device}, expected {ref.numel()} on {ref.device})"
        )
    check_contiguous(name, t)


def sqrt_rn_torch(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, as ``tl.sqrt_rn``.

    ``torch.sqrt`` on CPU float32 is *not* correctly rounded (measured here: about 20% of inputs are
    1 ulp off on an AVX-512 machine).  The float64 root rounded to float32 is: float64 carries more
    than 2*24+2 bits, so rounding twice gives the correctly rounded result.
    """
    return torch.sqrt(x.double()).to(x.dtype)


#: Elements a torch twin processes at once: 64K-element float32 temporaries stay in cache, which is
#: several times faster on CPU than whole-buffer temporaries (benchmarks/kernels.py).
TWIN_CHUNK = 1 << 16


#: Elements per chunk of the first-order twins' in-place path (:func:`workspace`): there a step is a
#: dozen ops per chunk, and per-op dispatch, not cache size, dominates at model sizes on a CPU
#: (benchmarks/host_cost.py); temporaries stay bounded at 4 MB (float32) each.
INPLACE_CHUNK = 1 << 20
_workspaces = threading.local()  # per thread: data-parallel replicas may step in threads of one process


def workspace(count: int, n: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """``count`` scratch vectors of ``n`` elements, kept between calls (a twin's temporaries, written with
    ``out=`` and in-place ops: the same arithmetic as fresh tensors, without allocating them each step)."""
    kept = _workspaces.__dict__
    key = (count, dtype, device)
    found = kept.get(key)
    if found is None or found[0].numel() < n:
        found = kept[key] = [torch.empty(n, dtype=dtype, device=device) for _ in range(count)]
    return [t[:n] for t in found]


def chunks(n: int, size: int = TWIN_CHUNK):
    """``(start, stop)`` slices of ``range(n)`` of at most ``size`` elements."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def grid(n: int) -> tuple[int]:
    return (max(1, math.ceil(n / TILE_SIZE)),)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def float64_twin(backend: str | None, *tensors: torch.Tensor) -> bool:
    """True when a first-order step must run in float64: float64 parameters are updated by the torch
    twin computing in float64 on any device (torch.optim computes in the parameter's dtype); there is no
    float64 Triton kernel, so asking for one is refused."""
    if tensors[0].dtype != torch.float64:
        return False
    if backend == "triton":
        raise ValueError(
            "there is no float64 Triton kernel; float64 parameters are updated by the torch twin "
            "in float64 (pass backend=None or 'torch')"
        )
    for t in tensors:
        if t is not None and t.dtype != torch.float64:
            raise ValueError(f"float64 parameters need float64 gradients and state, got {t.dtype}")
    return True


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


@triton.jit
def round_to(w, DTYPE: tl.constexpr):
    """float32 -> DTYPE with round-to-nearest-even on every backend.

    For bfloat16 the rounding is done on the bits (the interpreter's cast truncates), after which the
    cast is exact; NaN is passed through.  float32/float16 casts already round to nearest even.
    """
    if DTYPE == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        w = tl.where(w != w, w, rounded)
    return w.to(DTYPE)


@triton.jit
def sign(w):
    """-1, 0 or +1 as float32: the subgradient of |w| used by every kernel's L1 term."""
    return tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))


@triton.jit
def inv_sqrt_rn(h):
    """1 / sqrt(h) from two correctly rounded operations (``tl.rsqrt`` is approximate on GPUs)."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(h))


def inv_sqrt_rn_torch(h: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`inv_sqrt_rn`."""
    return 1.0 / sqrt_rn_torch(h)
