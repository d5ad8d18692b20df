"""Launch-shape sweep on a GPU: each kernel variant at several (TILE_SIZE, num_warps), measured in one run.

    python benchmarks/launch_sweep.py                         # the default variant list, 2**26 elements
    python benchmarks/launch_sweep.py --only sgd_step_ --shapes 1024x4 2048x4 --json PATH

The optimizers run on a model of ``--elements`` parameters with their launches recorded (as in
``compiled_cost.py --measure``); each selected variant's largest launch is replayed at every shape with
``triton.testing.do_bench`` (median), the grid recomputed for the block size.  Prints microseconds and
the fraction of the bandwidth of a ``torch`` float32 copy of the same number of elements (bytes per
element from the compiled kernel's TTIR), so the library's launch shape (``kernels/_common.py``:
TILE_SIZE, NUM_WARPS) can be chosen from measurements.  Needs CUDA.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # real kernels; before triton.jit runs

import argparse
import json
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compiled_cost import describe, optimizer_launches, row_key, signature_of, streamed_bytes  # noqa: E402

#: (kernel, dtype, distribution, q, options) swept by default: the kernels with speed targets and the plain
#: first-order steps, in both dtypes
DEFAULT_VARIANTS = [
    ("perturb_", "float32", "gaussian", 1, ()),
    ("perturb_", "float32", "rademacher", 1, ()),
    ("zo_update_", "float32", "gaussian", 1, ()),
    ("zo_update_", "float32", "rademacher", 1, ()),
    ("perturb_", "bfloat16", "gaussian", 1, ("source",)),
    ("perturb_", "bfloat16", "rademacher", 1, ("source",)),
    ("zo_update_", "bfloat16", "gaussian", 1, ("master",)),
    ("zo_update_", "bfloat16", "rademacher", 1, ("master",)),
    ("sgd_step_", "float32", None, None, ("first_step",)),
    ("sgd_step_", "bfloat16", None, None, ("first_step",)),
    ("adamw_step_", "float32", None, None, ()),
    ("adamw_step_", "bfloat16", None, None, ()),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["1024x4", "2048x4", "2048x8", "4096x8"],
        help="TILE_SIZExnum_warps launch shapes (the first is the baseline)",
    )
    parser.add_argument("--only", nargs="+", help="kernels to sweep (default: DEFAULT_VARIANTS)")
    parser.add_argument("--elements", type=int, default=2**26, help="parameters of the model (default 2**26)")
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (torch.cuda.is_available() is False)")
    import triton.testing

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]

    def seconds(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    src = torch.randn(args.elements, device="cuda")
    dst = torch.empty_like(src)
    copy_bytes_per_s = 8 * args.elements / seconds(lambda: dst.copy_(src))
    src = dst = None
    name = torch.cuda.get_device_name()
    print(
        f"{name}: copy {copy_bytes_per_s / 1e12:.2f} TB/s at {args.elements} float32; us per launch "
        f"(fraction of copy bandwidth) at each TILE_SIZExnum_warps",
        flush=True,
    )
    print(
        f"{'kernel':<13}{'dtype':<9}{'dist':<11}{'q':>2} {'options':<12}{'B/el':>5}"
        + "".join(f"{s:>16}" for s in args.shapes),
        flush=True,
    )
    rows, done = [], set()
    for _label, calls in optimizer_launches(hidden=max(1, args.elements // 17), device="cuda"):
        for fn, _grid, call_args, kwargs in calls:
            sig, constexprs, _attrs, tensors = signature_of(fn, call_args, kwargs)
            values = dict(zip(fn.arg_names, call_args)) | kwargs
            ident = describe(fn, sig, constexprs, values)
            key = row_key(ident)
            wanted = key[0] in args.only if args.only else key in DEFAULT_VARIANTS
            if key in done or not wanted or values["n"] < args.elements // 2:
                continue
            done.add(key)
            n, lead = values["n"], values.get("lead", 0)
            row = dict(ident, n=n, shapes={})
            nbytes = None
            for tile, warps in shapes:
                launch = dict(kwargs, TILE_SIZE=tile, num_warps=warps)
                grid = (max(1, math.ceil((n + lead) / tile)),)
                compiled = fn[grid](*call_args, **launch)  # compiles this shape once, outside the timing
                nbytes = nbytes or streamed_bytes(compiled.asm["ttir"], tensors, n)
                t = seconds(lambda: fn[grid](*call_args, **launch))  # noqa: B023 (called at once)
                row["shapes"][f"{tile}x{warps}"] = dict(seconds=t, fraction_of_copy=nbytes * n / t / copy_bytes_per_s)
            row["bytes_per_element"] = nbytes
            rows.append(row)
            print(
                f"{key[0]:<13}{key[1]:<9}{str(key[2] or '-'):<11}{str(key[3] or '-'):>2} "
                f"{','.join(key[4]) or '-':<12}{nbytes:>5}"
                + "".join(f"{r['seconds'] * 1e6:>9.1f} ({r['fraction_of_copy']:.2f})" for r in row["shapes"].values()),
                flush=True,
            )
        calls = None
        torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=name, copy_bytes_per_s=copy_bytes_per_s, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
