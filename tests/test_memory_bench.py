"""benchmarks/memory.py runs and its table is sound on LeNet (slow tier: about a minute on the 2-core VM):
every method at two batch sizes, peaks that grow with the batch, backprop above inference, and a 1 GiB
batch extrapolated from the slope."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_memory_table_on_lenet(tmp_path):
    out = tmp_path / "memory.json"
    command = [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--models", "lenet", "--batches", "32", "128"]
    subprocess.run([*command, "--device", "cpu", "--json", str(out)], check=True, cwd=REPO, timeout=900)
    result = json.loads(out.read_text())
    assert result["machine"] and result["command"].startswith("python")
    rows = [r for r in result["rows"] if not r.get("summary")]
    summaries = {r["method"]: r for r in result["rows"] if r.get("summary")}
    assert set(summaries) == {"inference", "sgd", "sgd-checkpoint", "zo-sgd", "zo-adam", "zo"}
    peak = {(r["method"], r["batch"]): r["peak_bytes"] for r in rows}
    for method in summaries:
        assert 0 < peak[method, 32] < peak[method, 128], method
        assert summaries[method]["bytes_per_example"] > 0 and summaries[method]["largest_batch_in_1gib"] > 128
    assert peak["sgd", 128] > peak["inference", 128]  # a backward pass keeps activations
