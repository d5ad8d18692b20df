"""Test instruments: is a step capturable?  Host synchronisations, launch lists and replay, checked without
a GPU.  (The CUDA-graph runtime that the trainer uses is :mod:`subgrad.capture`.)

A step can be captured in a CUDA graph and replayed when (1) it never waits for the device on the host
(no ``.item()``, ``bool(tensor)``, ``nonzero``...), and (2) every launch it makes, Triton kernel or ATen
op, takes the same non-tensor arguments and the same buffers at every step, because a replay re-issues
exactly the launches of the captured step.  Both are properties of the host code, so they can be checked
on the CPU, with the Triton kernels running in the interpreter (``TRITON_INTERPRET=1``) or stubbed:

* :class:`SyncCounter` counts the ATen calls that make the host wait for the device;
* :func:`record_step` records every launch of one call (a Triton launch with its grid, constexprs,
  scalars and tensors; an ATen op with its arguments), and :meth:`StepRecord.signature` names each
  tensor argument the way a graph sees it: a buffer that outlives the step by its address (``persistent``:
  parameters, optimizer state, counters, data), a temporary by its order of first use (a graph's private
  pool gives it the same address at every replay);
* :meth:`StepRecord.replay` re-issues the recorded launches on the recorded tensors, in order, with no
  Python logic in between: what a CUDA graph replay does.  A step whose replay equals an ordinary next
  step took nothing per step from the host.

``benchmarks/host_cost.py`` and ``tests/test_capture.py`` use these on every optimizer and on the
trainer's step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

#: ATen calls that make the host wait for the device: a value read back (item, bool, comparisons to a
#: Python value) or an output whose size depends on the data.
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::is_nonzero",
        "aten::equal",
        "aten::nonzero",
        "aten::nonzero_static",
        "aten::masked_select",
        "aten::unique",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::unique_dim",
        "aten::bincount",
        "aten::histc",
        "aten::repeat_interleave",  # without output_size its output size is read from the device
        "aten::_assert_async",
        "aten::allclose",
    }
)
#: ATen ops a step may make that launch nothing on the device (metadata, views)
NO_LAUNCH_OPS = frozenset(
    {
        "aten::view",
        "aten::_unsafe_view",
        "aten::reshape",
        "aten::as_strided",
        "aten::slice",
        "aten::select",
        "aten::unsqueeze",
        "aten::squeeze",
        "aten::expand",
        "aten::permute",
        "aten::t",
        "aten::transpose",
        "aten::detach",
        "aten::alias",
        "aten::view_as_real",
        "aten::view_as_complex",
        "aten::_reshape_alias",
        "aten::unbind",
        "aten::split",
        "aten::split_with_sizes",
        "aten::chunk",
        "aten::narrow",
        "aten::flatten",
        "aten::lift_fresh",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::_has_compatible_shallow_copy_type",
        "aten::is_same_size",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::numpy_T",
        "aten::set_",
        "profiler::_record_function_enter_new",
        "profiler::_record_function_exit",  # torch.optim's step label
    }
)


def _op_name(func) -> str:
    return func._schema.name


class SyncCounter(TorchDispatchMode):
    """Counts the calls in its block that make the host wait for the device (:data:`SYNC_OPS`, and any
    copy from a non-CPU tensor into host memory), by op name in ``counts``."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in SYNC_OPS or _reads_back(name, args, kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)


def _reads_back(name: str, args, kwargs) -> bool:
    """A device-to-host copy: ``_to_copy`` to the CPU, or ``copy_`` into a CPU tensor, of a device tensor."""
    if name == "aten::_to_copy" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
        return torch.device(kwargs.get("device") or args[0].device).type == "cpu"
    if name == "aten::copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


@dataclasses.dataclass
class Launch:
    """One recorded launch: a Triton kernel (``kind="triton"``) or an ATen op (``kind="aten"``)."""

    kind: str
    name: str
    call: Callable  # the kernel (indexable by grid) or the ATen overload
    grid: tuple | None
    args: tuple
    kwargs: dict
    outputs: object = None  # an ATen op's result (tensors to write a replay into)


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, launches: list[Launch]):
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.launches.append(Launch("aten", _op_name(func), func, None, args, kwargs, out))
        return out


class _TritonRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded, then run
    (outside any dispatch mode: the interpreter's own tensor copies are not the step's) or, stubbed, not
    run; a stubbed kernel that writes an ``out_ptr`` writes zeros there, so values stay finite."""

    def __init__(self, fn, launches: list[Launch], run: bool):
        self.fn, self.launches, self.run = fn, launches, run
        self.out_index = fn.arg_names.index("out_ptr") if "out_ptr" in fn.arg_names else None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch("triton", self.fn.__name__, self.fn, grid, args, kwargs))
            if self.run:
                with _disable_current_modes():
                    return self.fn[grid](*args, **kwargs)
            out = args[self.out_index] if self.out_index is not None and self.out_index < len(args) else None
            if isinstance(out, torch.Tensor):
                with _disable_current_modes():
                    out.zero_()

        return launch


@functools.cache
def _kernel_modules() -> tuple[tuple[object, str], ...]:
    """Every launched ``@triton.jit`` kernel of :mod:`subgrad.kernels` (by the package's rule, named
    ``*_kernel``; the other jit functions are device helpers the kernels call), as (module, attribute
    name), found by walking the package: a new kernel is recorded without editing a list.  Walked once per
    process (the kernels are fixed once imported), not at every recorded step."""
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface  # a JITFunction, or the interpreter's stand-in

    from . import kernels

    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, value in vars(module).items():
            kernel = isinstance(value, KernelInterface) and name.endswith("_kernel")
            if kernel and value.fn.__module__ == module.__name__:
                found.append((module, name))
    return tuple(found)


@contextlib.contextmanager
def triton_launches(launches: list[Launch], run: bool = True, force_triton: bool = False):
    """Within the block every subgrad kernel launch is appended to ``launches`` (and run unless
    ``run=False``).  ``force_triton`` makes every op take its Triton path whatever the tensors' device
    (the GPU code path on CPU tensors: with ``run=False``, or under ``TRITON_INTERPRET=1``)."""
    from .kernels import _common

    saved = []
    _common.launch_epoch += 1  # launchers prepared outside the block are stale inside it, and the reverse
    for module, name in _kernel_modules():
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, _TritonRecorder(getattr(module, name), launches, run))
        if force_triton:
            saved.append((module, "resolve_backend", module.resolve_backend))
            module.resolve_backend = lambda backend, *tensors: "triton"
    try:
        yield launches
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
        _common.launch_epoch += 1


def tensors_in(*objects, depth: int = 6) -> list[torch.Tensor]:
    """Every tensor reachable from ``objects`` through modules, dicts, lists, tuples, dataclasses and
    attributes (the buffers a step's owner keeps between steps)."""
    found, seen = [], set()

    def walk(obj, level):
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            if obj.grad is not None:
                walk(obj.grad, level)
        elif isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                walk(t, level + 1)
            walk(obj.__dict__, level + 1)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k, level + 1)
                walk(v, level + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                walk(v, level + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):  # dataclasses too
            walk(vars(obj), level + 1)

    for obj in objects:
        walk(obj, 0)
    return found


@dataclasses.dataclass
class StepRecord:
    """The launches one call made, and its host synchronisations."""

    launches: list[Launch]
    syncs: dict[str, int]

    @property
    def device_launches(self) -> list[Launch]:
        """The launches that run on the device: every Triton launch and every ATen op that computes."""
        return [x for x in self.launches if x.kind == "triton" or x.name not in NO_LAUNCH_OPS]

    def counts(self) -> dict[str, int]:
        return dict(
            triton=sum(x.kind == "triton" for x in self.device_launches),
            aten=sum(x.kind == "aten" for x in self.device_launches),
        )

    def signature(self, persistent: Iterable[torch.Tensor]) -> list[tuple]:
        """Each device launch as a graph replays it: name, grid, constexprs and non-tensor arguments
        as given, every tensor as (address, shape, strides, dtype) when it lies in one of the
        ``persistent`` buffers, else as (order of first use, shape, strides, dtype)."""
        spans = sorted(
            (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            for t in persistent
            if t.device.type != "meta"
        )
        temporaries: dict[int, int] = {}

        def persistent_at(ptr: int) -> bool:
            return any(start <= ptr < start + size or ptr == start for start, size in spans)

        def name(value):
            if isinstance(value, torch.Tensor):
                ptr = value.data_ptr()
                where = (
                    ("buffer", ptr)
                    if persistent_at(ptr)
                    else ("temporary", temporaries.setdefault(ptr, len(temporaries)))
                )
                return (*where, tuple(value.shape), tuple(value.stride()), str(value.dtype))
            if isinstance(value, (list, tuple)):
                return tuple(name(v) for v in value)
            if isinstance(value, dict):
                return tuple(sorted((k, name(v)) for k, v in value.items()))
            if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
                return str(value)
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            return type(value).__name__

        return [(x.kind, x.name, x.grid, name(x.args), name(x.kwargs)) for x in self.device_launches]

    def replay(self) -> None:
        """Re-issue every recorded launch on the recorded tensors, in order (a CUDA graph replay): ATen
        results are written into the tensors the recorded call returned (views and allocations are not
        re-issued: the recorded tensors are those views and allocations)."""
        with torch.no_grad():  # a replay is below autograd: the recorded backward ops are plain ops here
            self._replay()

    def _replay(self) -> None:
        for x in self.device_launches:
            if x.kind == "triton":
                x.call[x.grid](*x.args, **x.kwargs)
                continue
            out = x.call(*x.args, **x.kwargs)
            for old, new in zip(_flat_tensors(x.outputs), _flat_tensors(out)):
                if old.data_ptr() != new.data_ptr() and old.shape == new.shape:
                    old.copy_(new)


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def record_step(step: Callable[[], object], run: bool = True, force_triton: bool = False) -> StepRecord:
    """Run ``step()`` once with every launch recorded (see :func:`triton_launches` for ``run`` and
    ``force_triton``) and its host synchronisations counted."""
    launches: list[Launch] = []
    counter = SyncCounter()
    with triton_launches(launches, run=run, force_triton=force_triton), _AtenRecorder(launches), counter:
        step()
    return StepRecord(launches, counter.counts)
