"""Every kernel variant the optimizers launch compiles for sm_90, without spills, at its predicted speed.

Runs ``benchmarks/compiled_cost.py --arch sm_90`` (real Triton compilation with the wheel's ptxas; no GPU
needed) and checks its rows.  The model and its constants are explained in that file and in
``benchmarks/README.md``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here compiles every kernel variant for sm_90

REPO = pathlib.Path(__file__).resolve().parents[1]

#: (kernel, dtype, distribution, q, options) -> minimum predicted fraction of copy bandwidth, H100 and H200
ZO_TARGETS = {
    ("perturb_", "float32", "gaussian", 1, ()): 0.90,
    ("perturb_", "float32", "rademacher", 1, ()): 0.90,
    ("zo_update_", "float32", "gaussian", 1, ()): 0.90,
    ("zo_update_", "float32", "rademacher", 1, ()): 0.90,
    ("perturb_", "bfloat16", "gaussian", 1, ("source",)): 0.85,
    ("perturb_", "bfloat16", "rademacher", 1, ("source",)): 0.85,
    ("zo_update_", "bfloat16", "gaussian", 1, ("master",)): 0.85,
    ("zo_update_", "bfloat16", "rademacher", 1, ("master",)): 0.85,
    ("zo_update_", "float32", "rademacher", 4, ()): 0.85,
    # Accepted below the 0.5 once asked: a Box-Muller normal from Philox4x32-10 costs ~46 instructions per
    # direction and element (benchmarks/README.md), and Rademacher directions are the default wherever
    # q > 1.  The expectation is today's H200 prediction (0.335), so a change that makes it slower fails here.
    ("zo_update_", "float32", "gaussian", 4, ()): 0.33,
}


def _short_of_targets(rows, keys):
    short = []
    for r in rows:
        target = ZO_TARGETS.get(_key(r))
        if _key(r) in keys and min(r["predicted_fraction"].values()) < target:
            short.append(
                f"{_key(r)}: predicted {r['predicted_fraction']} < {target} "
                f"({r['sass_per_element']} SASS/element, {r['registers']} registers)"
            )
    return short


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost") / "cost.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real kernels
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compiled_cost.py"), "--arch", "sm_90", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    errors = [f"{r['kernel']} {r['dtype']} {r['options']}: {r['error']}" for r in data["kernels"] if "error" in r]
    assert not errors and run.returncode == 0, "compile errors:\n" + "\n".join(errors) + run.stderr[-2000:]
    return data["kernels"]


def _key(r):
    return r["kernel"], r["dtype"], r["distribution"], r["directions"], tuple(r["options"])


def test_every_optimizer_kernel_is_costed(rows):
    kernels = {r["kernel"] for r in rows}
    expected = {
        "perturb_",
        "zo_update_",
        "sgd_step_",
        "adamw_step_",
        "perturb_activity",
        "activity_gradient",
        "ref:copy",
    }
    assert expected <= kernels, kernels
    keys = {_key(r) for r in rows}
    missing = [k for k in ZO_TARGETS if k not in keys]
    assert not missing, f"variants the optimizers should launch but did not: {missing}"
    for r in rows:
        assert set(r["predicted_fraction"]) == {"H100", "H200"}, r
        assert r["bytes_per_element"] > 0 and r["sass_per_element"] > 0, r


def test_no_variant_spills_to_local_memory(rows):
    """Reference kernels are exempt: stock tl.randn keeps a 32-byte call frame for libdevice's slow paths."""
    spilling = [
        f"{_key(r)}: {r['local_memory_bytes']} B local, {r['stack_bytes']} B stack"
        for r in rows
        if not r["kernel"].startswith("ref:") and (r["local_memory_bytes"] or r["stack_bytes"])
    ]
    assert not spilling, "\n".join(spilling)


def test_first_order_updates_and_copy_are_memory_bound(rows):
    """On a flat gradient buffer the updates run at copy bandwidth (predicted)."""
    slow = [
        f"{_key(r)}: {r['predicted_fraction']}"
        for r in rows
        if r["kernel"] in ("sgd_step_", "adamw_step_", "ref:copy")
        and "grad_table" not in r["options"]
        and min(r["predicted_fraction"].values()) < 1.0
    ]
    assert not slow, "\n".join(slow)


def test_reading_gradients_through_a_table_beats_copying_them_first(rows):
    """Through an address table the gradient loads are unaligned (no vector loads), so an update may fall
    short of copy bandwidth; it must still beat its alternative, copying the gradients into a flat buffer
    (2 dtype-sized accesses per element at copy bandwidth) and then running at copy bandwidth:
    bytes / fraction <= bytes + 2 * size, i.e. fraction >= bytes / (bytes + 2 * size), where bytes
    counts the gradient read through the table."""
    table = [r for r in rows if r["kernel"] in ("sgd_step_", "adamw_step_") and "grad_table" in r["options"]]
    assert {r["kernel"] for r in table} == {"sgd_step_", "adamw_step_"}, "the optimizers launched no table variant"
    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    short = []
    for r in table:
        bound = r["bytes_per_element"] / (r["bytes_per_element"] + 2 * size[r["dtype"]])
        if min(r["predicted_fraction"].values()) < bound:
            short.append(f"{_key(r)}: {r['predicted_fraction']} < {bound:.3f}")
    assert not short, "\n".join(short)


def test_zeroth_order_kernels_meet_their_targets(rows):
    short = _short_of_targets(rows, set(ZO_TARGETS))
    assert not short, "\n".join(short)
