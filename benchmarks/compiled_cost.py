"""Compiled-code cost model: how close each kernel can get to copy bandwidth, read from its machine code.

    python benchmarks/compiled_cost.py [--arch sm_80 sm_90 sm_100] [--json PATH] [--only perturb_ ...]
    python benchmarks/compiled_cost.py --arch sm_90 --measure      # on a GPU: measured beside predicted

No GPU or driver needed.  Every kernel variant that subgrad's optimizers launch is found by running the
optimizers (ZOSGD, ZOAdam, HiZOO, SGD, AdamW over their option grid, fp32 and bf16, on a small model;
ZOSGD also through ``step(functional_closure=...)``, whose directions come from ``philox_normal`` /
``philox_rademacher``) with the kernel launches recorded instead of executed; each distinct variant is then
compiled by Triton for each NVIDIA target (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, the
ptxas in the triton wheel), and its SASS is read with the wheel's ``cuobjdump``:

* ``registers`` and ``local_memory_bytes`` (spills) from ``cuobjdump -res-usage``;
* ``sass_per_element``: instructions one thread executes per element on the common path (see
  :func:`fast_path`), split by execution pipe (:data:`PIPES`);
* ``bytes_per_element``: DRAM bytes per element, from the TTIR: each full-size buffer that the kernel
  loads counts its element size once, each that it stores once more (small tables such as per-block
  scalars stay in cache and count nothing);
* ``predicted_fraction``: per GPU, the kernel's predicted rate as a fraction of copy bandwidth:

      compute-bound rate = SMs * 4 schedulers * clock * 32 lanes / cycles_per_warp_element
      cycles_per_warp_element = max(instructions, max over pipes of instructions_pipe * 128 / lanes_pipe)
      memory-bound rate  = copy bandwidth / bytes_per_element
      predicted_fraction = min(1, compute-bound rate / memory-bound rate)

  i.e. a roofline over the issue slots and the execution pipes, with perfect overlap of memory and
  compute.  It predicts an upper bound: latency stalls, tail effects and DRAM efficiency below the copy
  kernel's are not modelled.

``--measure`` (needs CUDA) calibrates the model: the optimizers run again on the GPU on a model of
``--measure-elements`` parameters (default 2**26, several times the L2), their launches are recorded
the same way, and each variant's largest launch is replayed with ``triton.testing.do_bench`` (median).
Its measured fraction of copy bandwidth is ``bytes_per_element * n / seconds`` over the bandwidth of a
``torch`` device-to-device copy of the same number of float32 elements timed in the same run; rows of
the GPU's own arch gain ``measured`` (device, n, seconds, fraction_of_copy).  ``gpu_check.sh`` runs it.

Reference kernels compiled alongside (``kernel`` names starting with ``ref:``): a copy ``y = x + 1``
(the memory-bound anchor) and a perturbation with stock ``tl.randn`` (what public zeroth-order
trainers run on GPUs).  Run it with ``TRITON_INTERPRET`` unset (this script unsets it).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels; must happen before triton.jit runs

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from subgrad.testing import triton_launches

# --------------------------------------------------------------------------------------------------
# Model constants.  Sources: NVIDIA A100 / H100 / H200 datasheets (SM counts, boost clocks, peak HBM
# bandwidth); copy bandwidths are device-to-device copy rates typically measured at ~85-90% of the
# HBM peak (4.3 TB/s for H200 and 3.0 TB/s for H100 SXM, NVIDIA's figures); per-pipe rates are the
# CUDA C++ Programming Guide's "throughput of native arithmetic instructions" table (operations per
# clock per SM).  Kept as published: the H200 measurements (benchmarks/README.md) read as a calibration.
# --------------------------------------------------------------------------------------------------
GPUS = {
    #        arch  SMs  boost GHz  copy TB/s (peak HBM TB/s)
    "A100": dict(arch=80, sms=108, clock_ghz=1.41, copy_tb_s=1.75, hbm_tb_s=2.04),  # A100-SXM4-80GB
    "H100": dict(arch=90, sms=132, clock_ghz=1.98, copy_tb_s=3.0, hbm_tb_s=3.35),  # H100 SXM5
    "H200": dict(arch=90, sms=132, clock_ghz=1.98, copy_tb_s=4.3, hbm_tb_s=4.8),  # H200 SXM
}
SCHEDULERS_PER_SM = 4  # each issues one warp-instruction per clock
#: lanes per SM per clock of each execution pipe (an instruction on a pipe with L lanes occupies its
#: scheduler's share of the pipe for 128 / L clocks per warp)
PIPES = {
    80: dict(fp32=64, int=64, xu=16, lsu=32),
    90: dict(fp32=128, int=64, xu=16, lsu=32),
    100: dict(fp32=128, int=64, xu=16, lsu=32),
}
#: SASS opcode -> pipe ("issue" = issue slot only: control, uniform datapath, moves handled elsewhere)
FP32_OPS = {"FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2", "FMUL32I", "FADD32I", "FFMA32I"}
INT_OPS = {
    "IMAD",
    "IMUL",
    "IADD3",
    "IADD",
    "LOP3",
    "LOP",
    "SHF",
    "SHL",
    "SHR",
    "ISETP",
    "SEL",
    "FSEL",
    "FSETP",
    "FMNMX",
    "IMNMX",
    "LEA",
    "PRMT",
    "IABS",
    "PLOP3",
    "MOV",
    "P2R",
    "R2P",
    "BMSK",
    "VIADD",
    "VIMNMX",
    "FCHK",
    "SGXT",
    "HSETP2",
    "HMNMX2",
    "ISCADD",
    "BFE",
    "BFI",
    "FSWZADD",
    "VABSDIFF",
}
XU_OPS = {"MUFU", "I2F", "F2I", "F2F", "I2FP", "F2FP", "FRND", "POPC", "FLO", "BREV", "I2I"}
LSU_OPS = {"LDG", "STG", "LD", "ST", "LDS", "STS", "LDL", "STL", "LDC", "ATOM", "RED", "ATOMG"}

KERNEL_NAMES = {
    "perturb_kernel": "perturb_",
    "zo_update_kernel": "zo_update_",
    "sgd_kernel": "sgd_step_",
    "adamw_kernel": "adamw_step_",
    "philox_direction_kernel": "philox_direction",
    "perturb_activity_kernel": "perturb_activity",
    "activity_gradient_kernel": "activity_gradient",
}
#: kernels that draw Rademacher signs without a RADEMACHER flag, and their count of directions
ACTIVITY_KERNELS = {"perturb_activity_kernel": None, "activity_gradient_kernel": "q"}
#: constexpr flag -> option name in the JSON (a flag set to True adds its option)
OPTION_FLAGS = {
    "HAS_SOURCE": "source",
    "HAS_PRECOND": "precond",
    "HAS_MASTER": "master",
    "HAS_MOMENTUM": "momentum",
    "HAS_HESSIAN": "hessian",
    "NESTEROV": "nesterov",
    "FIRST_STEP": "first_step",
    "HAS_WEIGHT_DECAY": "weight_decay",
    "HAS_L1": "l1",
    "MAXIMIZE": "maximize",
    "AMSGRAD": "amsgrad",
    "GRAD_TABLE": "grad_table",
    "DEVICE_SCALARS": "device_scalars",
}
TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.bool: "i1",
    torch.int32: "i32",
}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------------
# 1. Which variants the optimizers launch: run them with the launches recorded, not executed
# --------------------------------------------------------------------------------------------------
def optimizer_grid():
    """(label, dtype, factory(params) -> optimizer) for every optimizer configuration the library offers."""
    from subgrad.optim import SGD, ZOSGD, AdamW, HiZOO, ZOAdam

    grid = []
    for dtype in (torch.float32, torch.bfloat16):
        for dist in ("gaussian", "rademacher"):
            grid += [
                ("zosgd", dtype, lambda p, d=dist: ZOSGD(p, lr=1e-3, distribution=d)),
                (
                    "zosgd-forward-q4",
                    dtype,
                    lambda p, d=dist: ZOSGD(p, lr=1e-3, q=4, estimator="forward", distribution=d),
                ),
                (
                    "zosgd-blocks-momentum",
                    dtype,
                    lambda p, d=dist: ZOSGD(
                        p, lr=1e-3, blocks="module", momentum=0.9, weight_decay=1e-4, l1=1e-5, distribution=d
                    ),
                ),
                ("zoadam-q4", dtype, lambda p, d=dist: ZOAdam(p, lr=1e-3, q=4, estimator="forward", distribution=d)),
                ("hizoo", dtype, lambda p, d=dist: HiZOO(p, lr=1e-3, eps=1e-2, distribution=d)),
                # step(functional_closure=...): the directions are materialised by philox_normal/_rademacher
                ("zosgd-batched", dtype, lambda p, d=dist: ZOSGD(p, lr=1e-3, q=2, distribution=d)),
            ]
        grid += [
            ("sgd", dtype, lambda p: SGD(p, lr=0.1)),
            ("sgd-momentum", dtype, lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)),
            ("sgd-nesterov", dtype, lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
            ("adamw", dtype, lambda p: AdamW(p, lr=1e-3)),
            ("adamw-amsgrad", dtype, lambda p: AdamW(p, lr=1e-3, amsgrad=True)),
            # what a CUDA-graph step launches: device step count and lr (bias corrections in the kernel)
            ("adamw-capturable", dtype, lambda p: AdamW(p, lr=torch.tensor(1e-3), capturable=True)),
            ("sgd-lr-tensor", dtype, lambda p: SGD(p, lr=torch.tensor(0.1), momentum=0.9)),
        ]
        grid += [("zosgd-lr-tensor", dtype, lambda p: ZOSGD(p, lr=torch.tensor(1e-3), distribution="gaussian"))]
    return grid


def optimizer_launches(hidden: int = 16, device: str | torch.device = "cpu"):
    """For every configuration in :func:`optimizer_grid`, two steps on a 12-``hidden``-3 MLP (about
    17 * hidden parameters) with the element-wise kernels' launches recorded; yields
    ``(label, [(fn, grid, args, kwargs)])``.
    The recorded arguments keep the optimizer's buffers alive, so a caller can replay them."""
    x = torch.randn(8, 12, device=device)
    y = torch.randint(0, 3, (8,), device=device)
    for label, dtype, factory in optimizer_grid():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
        model = model.to(device=device, dtype=dtype)
        opt = factory(model.named_parameters())
        zeroth_order = hasattr(opt, "forward_passes")
        launches = []
        with triton_launches(launches, run=False, force_triton=True):  # recorded, not run
            for _ in range(2):
                if label.endswith("batched"):
                    opt.step(
                        functional_closure=lambda p: torch.nn.functional.cross_entropy(
                            torch.func.functional_call(model, p, (x.to(dtype),)).float(), y
                        )
                    )
                elif zeroth_order:
                    opt.step(lambda: torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y))
                else:
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
                    opt.step()
        # the element-wise kernels only: next_step_seed_ runs one lane per step, with no elements to cost
        yield label, [(x.call, x.grid, x.args, x.kwargs) for x in launches if x.call.__name__ in KERNEL_NAMES]


def activity_launches(device: str | torch.device = "cpu"):
    """ActivityZO (``--optimizer zo``) on LeNet, batch 2, at q 1 and 8, with per-part local losses and
    without: ``(label, [(fn, grid, args, kwargs)])`` of its element-wise kernels, recorded, not run."""
    from subgrad.models import build_model
    from subgrad.optim import ActivityZO

    x = torch.randn(2, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (2,), device=device)
    for label, settings in (("zo", dict(q=1)), ("zo-q8", dict(q=8)), ("zo-parts", dict(patches=7, groups=2))):
        torch.manual_seed(0)
        opt = ActivityZO(build_model("lenet").to(device).train(), lr=1e-3, backend="triton", **settings)
        launches = []
        with triton_launches(launches, run=False, force_triton=True):
            opt.step(x, y)
        yield label, [(x.call, x.grid, x.args, x.kwargs) for x in launches if x.call.__name__ in ACTIVITY_KERNELS]


def record_optimizer_launches() -> list:
    """Every launch of :func:`optimizer_launches` on the small CPU model and of :func:`activity_launches`:
    ``(label, fn, grid, args, kwargs)``."""
    calls = [*optimizer_launches(), *activity_launches()]
    return [(label, *call) for label, launches in calls for call in launches]


# --------------------------------------------------------------------------------------------------
# 2. One compiled variant per distinct (kernel, argument types, constexprs)
# --------------------------------------------------------------------------------------------------
def signature_of(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """Triton signature, constexprs, attrs (16-byte alignment of pointers and specialised ints) and the
    tensors bound to pointer arguments, for one recorded launch."""
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    sig, constexprs, attrs, tensors = {}, {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if name in constexpr_names:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + TORCH_TO_TRITON[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
            tensors[name] = value
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if i not in fn.do_not_specialize:  # Triton specialises such ints on divisibility by 16: assume
                attrs[(i,)] = [["tt.divisibility", 16]]  # the common large-buffer case (n % 16 == 0)
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return sig, constexprs, attrs, tensors


def describe(fn, sig: dict, constexprs: dict, values: dict) -> dict:
    """The JSON identity of a variant: kernel, dtype, distribution, directions, options."""
    first_pointer = next(name for name, t in sig.items() if t.startswith("*"))
    options = [opt for flag, opt in OPTION_FLAGS.items() if constexprs.get(flag) is True]
    if constexprs.get("SEARCH_STEPS", 0):
        options.append("blocks")
    if "RADEMACHER" in constexprs:
        distribution = "rademacher" if constexprs["RADEMACHER"] else "gaussian"
    else:
        distribution = "rademacher" if fn.__name__ in ACTIVITY_KERNELS else None
    if fn.__name__ in ACTIVITY_KERNELS:
        options += [opt for flag, opt in (("HAS_ACTIVE", "active"), ("HAS_PARTS", "parts")) if constexprs.get(flag)]
        count = ACTIVITY_KERNELS[fn.__name__]
        directions = values.get(count, 1) if count else 1
    else:
        directions = values.get("num_directions", 1) if distribution else None
    return dict(
        kernel=KERNEL_NAMES.get(fn.__name__, fn.__name__),
        dtype=DTYPE_NAMES[sig[first_pointer][1:]],
        distribution=distribution,
        directions=directions,
        options=sorted(options),
    )


#: the argument that holds a kernel's element count (the size of its full-size buffers), where it is not ``n``
#: (activity_gradient's ``n`` is the examples; its per-part loss differences are a small table)
ELEMENT_COUNT_ARG = {"perturb_activity_kernel": "count", "activity_gradient_kernel": "total"}


def distinct_variants(launches: list) -> list[dict]:
    """Deduplicate recorded launches; keep which optimizer configurations launch each variant."""
    variants = {}
    for label, fn, _grid, args, kwargs in launches:
        sig, constexprs, attrs, tensors = signature_of(fn, args, kwargs)
        values = dict(zip(fn.arg_names, args)) | kwargs
        ident = describe(fn, sig, constexprs, values)
        # one binary per (kernel, types, constexprs); q is a runtime loop count within it
        key = fn.__name__ + json.dumps(sig, sort_keys=True) + repr(sorted(constexprs.items()))
        entry = variants.setdefault(
            key,
            dict(
                ident=ident,
                fn=fn,
                sig=sig,
                constexprs=constexprs,
                attrs=attrs,
                n=values.get(ELEMENT_COUNT_ARG.get(fn.__name__, "n")),
                tensors=tensors,
                options=kwargs,
                used_by=set(),
                directions=set(),
            ),
        )
        entry["used_by"].add(label)
        entry["directions"].add(ident["directions"])
    return list(variants.values())


# --------------------------------------------------------------------------------------------------
# Reference kernels (calibration anchors)
# --------------------------------------------------------------------------------------------------
@triton.jit
def ref_copy_kernel(x_ptr, y_ptr, n, TILE_SIZE: tl.constexpr):
    """y = x + 1: one read, one write, no arithmetic to speak of."""
    pos = tl.program_id(0).to(tl.int64) * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = pos < n
    tl.store(y_ptr + pos, tl.load(x_ptr + pos, mask=mask) + 1.0, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def ref_randn_perturb_kernel(x_ptr, n, seed, scale, TILE_SIZE: tl.constexpr):
    """x += scale * tl.randn(seed, i): the stock Triton way (one Philox call per element)."""
    pos = tl.program_id(0).to(tl.int64) * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = pos < n
    x = tl.load(x_ptr + pos, mask=mask)
    tl.store(x_ptr + pos, x + scale * tl.randn(seed, pos.to(tl.int32)), mask=mask)


def reference_variants() -> list[dict]:
    n = 1 << 20
    x = torch.empty(n)
    out = []
    for fn, args, name in (
        (ref_copy_kernel, (x, x, n), "ref:copy"),
        (ref_randn_perturb_kernel, (x, n, 12345, 1e-3), "ref:tl.randn perturb"),
    ):
        sig, constexprs, attrs, tensors = signature_of(fn, args, dict(TILE_SIZE=1024))
        out.append(
            dict(
                ident=dict(
                    kernel=name,
                    dtype="float32",
                    distribution="gaussian" if "randn" in name else None,
                    directions=1 if "randn" in name else None,
                    options=[],
                ),
                fn=fn,
                sig=sig,
                constexprs=constexprs,
                attrs=attrs,
                n=n,
                tensors=tensors,
                options=dict(num_warps=4),
                used_by={"reference"},
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# 3. Compile, read the SASS, cost it
# --------------------------------------------------------------------------------------------------
def nvidia_tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return str(pathlib.Path(nvidia.__file__).parent / "bin" / name)


def compile_variant(variant: dict, arch: int):
    """triton.compile for one NVIDIA target; the kernels' own launch options (warps, no FMA contraction)."""
    options = dict(
        num_warps=variant["options"].get("num_warps", 4),
        enable_fp_fusion=variant["options"].get("enable_fp_fusion", True),
    )
    src = ASTSource(variant["fn"], variant["sig"], variant["constexprs"], variant["attrs"])
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def read_sass(cubin: bytes) -> tuple[list[tuple[int, str]], dict]:
    """(address, instruction) pairs and the resource usage (REG, LOCAL, SHARED, ...) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
        usage = subprocess.run(
            [nvidia_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    instructions = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    resources = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return instructions, resources


def _opcode(instruction: str) -> str:
    text = re.sub(r"^@!?U?P[T0-9]+\s+", "", instruction)  # drop the guard predicate
    return text.split()[0]


def _branch_target(instruction: str) -> int | None:
    m = re.search(r"\b(?:BRA|CALL\.REL(?:\.NOINC)?|BSSY)\b.*?(0x[0-9a-f]+)", instruction)
    return int(m.group(1), 16) if m else None


def fast_path(instructions: list[tuple[int, str]], loop_trips: int, slow_path_window: int = 16) -> list[str]:
    """The instructions one thread executes on the common path, in order.

    Straight-line from the entry to EXIT, with these rules: a guarded forward branch over a short region
    holding a CALL is taken (the CALL is a rarely-run slow path, e.g. ``div_rn``/``sqrt_rn`` on
    denormals); a guarded forward branch over a loop (a region holding a back edge into itself) is taken
    when ``loop_trips`` is 0 (the loop is skipped); an unguarded branch is followed; a backward branch
    (a loop) is taken ``loop_trips - 1`` times, so the body counts ``loop_trips`` iterations.
    """
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    path, i, trips = [], 0, {}
    while i < len(instructions) and len(path) < 200_000:
        addr, ins = instructions[i]
        op = _opcode(ins)
        path.append(ins)
        if op == "EXIT" and not ins.startswith("@"):
            break
        if op.startswith("BRA"):
            target = _branch_target(ins)
            # guarded by a prefix predicate (@P0 BRA) or a predicate operand (BRA.U !UP0, ...; sm_100)
            guarded = ins.startswith("@") or re.search(r"\bBRA(?:\.\w+)*\s+!?U?P[T0-9]+\s*,", ins) is not None
            if target is not None and target < addr:  # loop back edge
                trips[addr] = trips.get(addr, 0) + 1
                if trips[addr] < loop_trips:
                    i = index[target]
                    continue
            elif target is not None and not guarded:
                i = index[target]
                continue
            elif target is not None:
                j = index[target]
                region = [_opcode(s) for _, s in instructions[i + 1 : j]]
                if len(region) <= slow_path_window and any(o.startswith("CALL") for o in region):
                    i = j
                    continue
                skips_loop = any(
                    _opcode(s).startswith("BRA") and (t := _branch_target(s)) is not None and addr < t < a
                    for a, s in instructions[i + 1 : j]
                )
                if skips_loop and loop_trips == 0:
                    i = j
                    continue
        i += 1
    return path


def pipe_of(op: str) -> str:
    base = op.split(".")[0]
    if base in FP32_OPS:
        return "fp32"
    if base in INT_OPS:
        return "int"
    if base in XU_OPS:
        return "xu"
    if base in LSU_OPS:
        return "lsu"
    return "issue"  # control flow, uniform-datapath (U*) and other issue-only instructions


def pipe_counts(path: list[str]) -> dict[str, float]:
    counts = dict(fp32=0.0, int=0.0, xu=0.0, lsu=0.0, issue=0.0)
    for ins in path:
        op = _opcode(ins)
        weight = 2.0 if op.startswith("IMAD.WIDE") else 1.0  # 64-bit result: two passes of the int pipe
        counts[pipe_of(op)] += weight
    return counts


def streamed_bytes(ttir: str, tensors: dict, n: int | None) -> int:
    """DRAM bytes per element: full-size buffers loaded (once) and stored (once more), from the TTIR."""
    defs = {}
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.]+)(?::\d+)? = [\w.]+ (%[\w.]+)", line)
        if m:
            defs[m.group(1)] = m.group(2)
    accesses = set()
    for line in ttir.splitlines():
        m = re.match(r"\s*(?:%[\w.]+ = )?tt\.(load|store) (%[\w.]+)", line)
        if not m:
            continue
        name, seen = m.group(2), set()
        while name in defs and name not in seen:
            seen.add(name)
            name = defs[name]
        accesses.add((m.group(1), name.lstrip("%")))
    total = 0
    for _kind, arg in accesses:  # a buffer both loaded and stored is in the set twice
        t = tensors.get(arg)
        if t is not None and (n is None or t.numel() == n):  # small tables are cache-resident
            total += t.element_size()
    return total


#: runtime-loop trip count of each kernel at q directions (zo_update_ loops over all but the last one)
LOOP_TRIPS = {"zo_update_": lambda q: q - 1, "activity_gradient": lambda q: q}


def compiled(variant: dict, arch: int) -> tuple[list[tuple[int, str]], dict, int]:
    """Compile one variant for one arch: its SASS, resource usage and DRAM bytes per element."""
    kernel = compile_variant(variant, arch)
    instructions, resources = read_sass(kernel.asm["cubin"])
    nbytes = streamed_bytes(kernel.asm["ttir"], variant["tensors"], variant["n"])
    if variant["constexprs"].get("GRAD_TABLE"):  # gradients read through their addresses, not a buffer
        nbytes += variant["tensors"]["param_ptr"].element_size()
    return instructions, resources, nbytes


def cost(variant: dict, arch: int, directions: int | None, binary) -> dict:
    """Apply the model to one compiled variant (``binary`` from :func:`compiled`) at q = ``directions``."""
    instructions, resources, nbytes = binary
    trips = LOOP_TRIPS.get(variant["ident"]["kernel"], lambda q: 1)(directions or 1)
    path = fast_path(instructions, trips)
    warps = variant["options"].get("num_warps", 4)
    per_thread = variant["constexprs"]["TILE_SIZE"] / (32 * warps)  # elements one thread handles
    counts = {k: v / per_thread for k, v in pipe_counts(path).items()}
    total = sum(counts.values())
    lanes = PIPES[arch]
    cycles = max([total] + [counts[p] * 128 / lanes[p] for p in ("fp32", "int", "xu", "lsu")])
    fractions = {}
    for gpu, spec in GPUS.items():
        if spec["arch"] != arch:
            continue
        compute_rate = spec["sms"] * SCHEDULERS_PER_SM * spec["clock_ghz"] * 1e9 * 32 / cycles
        memory_rate = spec["copy_tb_s"] * 1e12 / max(nbytes, 1)
        fractions[gpu] = round(min(1.0, compute_rate / memory_rate), 3)
    return dict(
        arch=f"sm_{arch}",
        registers=resources.get("REG"),
        local_memory_bytes=resources.get("LOCAL", 0),
        stack_bytes=resources.get("STACK", 0),
        sass_per_element=round(total, 2),
        sass_per_element_by_pipe={k: round(v, 2) for k, v in counts.items()},
        bytes_per_element=nbytes,
        predicted_fraction=fractions,
    )


def supported_archs(requested: list[int]) -> list[int]:
    """Drop targets the wheel's ptxas cannot build (sm_100 needs the Blackwell ptxas)."""
    out = []
    for arch in requested:
        if arch >= 100 and not pathlib.Path(nvidia_tool("ptxas-blackwell")).exists():
            print(f"sm_{arch}: skipped (no ptxas for it in this triton wheel)", file=sys.stderr)
            continue
        out.append(arch)
    return out


def run(archs: list[int], only: list[str] | None = None) -> list[dict]:
    variants = reference_variants() + distinct_variants(record_optimizer_launches())
    if only:
        variants = [v for v in variants if v["ident"]["kernel"] in only]
    rows = []
    for variant in variants:
        # zo_update_ loops over q at run time: one binary, costed at each q the optimizers launched it with
        qs = sorted(variant.get("directions") or {variant["ident"]["directions"]}, key=lambda q: q or 0)
        for arch in archs:
            try:
                binary = compiled(variant, arch)  # once per arch, whatever the number of q values
            except Exception as exc:  # a compile error is a finding, not a crash of the report
                binary, error = None, f"{type(exc).__name__}: {str(exc)[:500]}"
            for q in qs:
                result = cost(variant, arch, q, binary) if binary else dict(arch=f"sm_{arch}", error=error)
                rows.append(dict(variant["ident"], directions=q, **result, used_by=sorted(variant["used_by"])))
    return rows


def render(rows: list[dict]) -> str:
    gpus = list(GPUS)
    head = (
        f"{'kernel':<22}{'dtype':<9}{'dist':<11}{'q':>2}  {'options':<36}{'arch':<7}{'regs':>5}{'local':>6}"
        f"{'SASS/el':>8}{'int':>6}{'B/el':>5}  " + "  ".join(f"{g:>5}" for g in gpus)
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<22}{r['dtype']:<9}{str(r['distribution']):<11}  {r['arch']}: {r['error']}")
            continue
        frac = "  ".join(
            f"{r['predicted_fraction'][g]:>5.2f}" if g in r["predicted_fraction"] else f"{'':>5}" for g in gpus
        )
        lines.append(
            f"{r['kernel']:<22}{r['dtype']:<9}{str(r['distribution'] or '-'):<11}"
            f"{str(r['directions'] or '-'):>2}  {','.join(r['options']) or '-':<36}{r['arch']:<7}"
            f"{r['registers']:>5}{r['local_memory_bytes']:>6}{r['sass_per_element']:>8.1f}"
            f"{r['sass_per_element_by_pipe']['int']:>6.1f}{r['bytes_per_element']:>5}  {frac}"
        )
    return "\n".join(lines)


#: benchmarks/kernels.py op -> the compiled variant it times (fp32, one direction, no options)
MEASURED_OPS = {
    "copy": ("ref:copy", None),
    "perturb": ("perturb_", "gaussian"),
    "perturb_rademacher": ("perturb_", "rademacher"),
    "zo_update": ("zo_update_", "gaussian"),
    "sgd": ("sgd_step_", None),
    "adamw": ("adamw_step_", None),
}


def compare_with_measured(rows: list[dict], kernels_json: pathlib.Path) -> str:
    """Predicted beside measured fractions of copy bandwidth, for a kernels-cuda-*.json from a real GPU
    (the largest n of each op).  This is how the model's constants get calibrated."""
    data = json.loads(kernels_json.read_text())
    gpu = next((g for g in GPUS if g in data["device"]), None)
    if gpu is None:
        return f"{kernels_json}: device {data['device']!r} is not one of the modelled GPUs {list(GPUS)}"
    lines = [f"{data['device']}: predicted (model, {gpu}) vs measured (benchmarks/kernels.py) fraction of copy"]
    for op, (kernel, dist) in MEASURED_OPS.items():
        measured = [r for r in data["rows"] if r["op"] == op and r.get("fraction_of_copy") is not None]
        predicted = [
            r["predicted_fraction"][gpu]
            for r in rows
            if r.get("kernel") == kernel
            and r.get("dtype") == "float32"
            and r.get("distribution") == dist
            and r.get("directions") in (None, 1)
            and gpu in r.get("predicted_fraction", {})
            and (not r["options"] or kernel in ("sgd_step_", "adamw_step_"))
        ]
        if measured and predicted:
            big = max(measured, key=lambda r: r["n"])
            lines.append(
                f"  {op:<10} n={big['n']:<10} predicted {min(predicted):.2f}  measured {big['fraction_of_copy']:.2f}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# 4. Measured on a real GPU (--measure): the calibration of the model
# --------------------------------------------------------------------------------------------------
def row_key(ident: dict) -> tuple:
    """What identifies a row within one arch: kernel, dtype, distribution, q, options."""
    return ident["kernel"], ident["dtype"], ident["distribution"], ident["directions"], tuple(ident["options"])


def measure_on_gpu(rows: list[dict], elements: int, device: str = "cuda") -> int:
    """Time every variant's largest launch on this GPU (see the module docstring), print predicted beside
    measured as each is timed (a run stopped early keeps what it printed), attach ``measured`` to the
    matching rows of the GPU's arch; returns the number of timed variants without a compiled row."""
    import triton.testing

    device = torch.device(device)
    name = torch.cuda.get_device_name(device)
    arch = "sm_%d%d" % torch.cuda.get_device_capability(device)
    gpu = next((g for g in GPUS if g in name), None)
    by_key = {row_key(r): r for r in rows if r.get("arch") == arch and "error" not in r}

    def seconds(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    copy_bytes_per_s = 8 * elements / seconds(lambda: dst.copy_(src))
    print(
        f"{name} ({arch}): copy {copy_bytes_per_s / 1e12:.2f} TB/s at {elements} float32; predicted "
        f"({gpu or 'no modelled GPU'}) vs measured fraction of copy bandwidth",
        flush=True,
    )
    print(
        f"  {'kernel':<22}{'dtype':<9}{'dist':<11}{'q':>2}  {'options':<40}{'B/el':>5}{'us':>9}"
        f"{'predicted':>10}{'measured':>9}",
        flush=True,
    )
    timed, unmatched = set(), []

    def record(key: tuple, t: float, n: int) -> None:
        timed.add(key)
        r = by_key.get(key)
        if r is None:
            unmatched.append(key)
            return
        fraction = r["bytes_per_element"] * n / t / copy_bytes_per_s
        r["measured"] = dict(device=name, n=n, seconds=t, fraction_of_copy=round(fraction, 3))
        predicted = r["predicted_fraction"].get(gpu, float("nan"))
        print(
            f"  {r['kernel']:<22}{r['dtype']:<9}{str(r['distribution'] or '-'):<11}"
            f"{str(r['directions'] or '-'):>2}  {','.join(r['options']) or '-':<40}"
            f"{r['bytes_per_element']:>5}{t * 1e6:>9.1f}{predicted:>10.2f}{fraction:>9.2f}",
            flush=True,
        )

    tile = 1024
    grid = (triton.cdiv(elements, tile),)
    record(
        row_key(dict(kernel="ref:copy", dtype="float32", distribution=None, directions=None, options=[])),
        seconds(lambda: ref_copy_kernel[grid](src, dst, elements, TILE_SIZE=tile)),
        elements,
    )
    record(
        row_key(
            dict(kernel="ref:tl.randn perturb", dtype="float32", distribution="gaussian", directions=1, options=[])
        ),
        seconds(lambda: ref_randn_perturb_kernel[grid](dst, elements, 12345, 1e-3, TILE_SIZE=tile)),
        elements,
    )
    src = dst = None  # free them before the optimizers allocate
    for _label, calls in optimizer_launches(hidden=max(1, elements // 17), device=device):
        largest = {}  # row key -> its largest launch in this configuration
        for fn, launch_grid, args, kwargs in calls:
            sig, constexprs, _attrs, _tensors = signature_of(fn, args, kwargs)
            values = dict(zip(fn.arg_names, args)) | kwargs
            key = row_key(describe(fn, sig, constexprs, values))
            if key not in timed and values["n"] > largest.get(key, (0,))[0]:
                largest[key] = (values["n"], fn, launch_grid, args, kwargs)
        for key, (n, fn, launch_grid, args, kwargs) in largest.items():
            record(key, seconds(lambda: fn[launch_grid](*args, **kwargs)), n)
        calls = largest = None
        torch.cuda.empty_cache()
    if unmatched:
        print(f"  timed but not compiled for {arch} (run with --arch {arch}): {unmatched}")
    return len(unmatched)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        nargs="+",
        default=["sm_80", "sm_90", "sm_100"],
        help="NVIDIA targets (default: sm_80 sm_90 sm_100; sm_100 only where ptxas supports it)",
    )
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here")
    parser.add_argument("--only", nargs="+", help="kernels to cost (e.g. perturb_ zo_update_)")
    parser.add_argument(
        "--measured",
        type=pathlib.Path,
        nargs="*",
        default=[],
        help="kernels-cuda-*.json from benchmarks/kernels.py: print measured beside predicted",
    )
    parser.add_argument(
        "--measure", action="store_true", help="on a CUDA GPU: replay every variant there and add its measured fraction"
    )
    parser.add_argument(
        "--measure-elements",
        type=int,
        default=2**26,
        help="parameters of the model the optimizers run on for --measure (default 2**26)",
    )
    args = parser.parse_args(argv)
    if args.measure and not torch.cuda.is_available():
        parser.error("--measure needs a CUDA GPU (torch.cuda.is_available() is False); drop it to predict only")
    archs = supported_archs([int(a.removeprefix("sm_")) for a in args.arch])
    start = time.perf_counter()
    rows = run(archs, args.only)
    print(render(rows))
    print(
        f"{len(rows)} rows in {time.perf_counter() - start:.0f} s; predicted fraction of copy bandwidth "
        "(roofline of issue slots and pipes vs DRAM; an upper bound: measured H200 calibration in "
        "benchmarks/README.md)"
    )
    for path in args.measured:
        print(compare_with_measured(rows, path))
    unmatched = measure_on_gpu(rows, args.measure_elements) if args.measure else 0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                dict(triton=triton.__version__, torch=torch.__version__, gpus=GPUS, pipes=PIPES, kernels=rows), indent=1
            )
        )
    return 1 if unmatched or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
