"""Data-parallel training on CPU with gloo and 2 processes (torchrun).

* 2 ranks equal 1 rank seeing the same global batches and directions: the only difference is how the
  shard means round.  zo (ActivityZO, 4 steps at lr 1e-3): Adam's first steps move a weight by about lr
  whatever the gradient's size, so a rounding difference in a near-zero gradient can flip one step:
  bound 2 lr per step.  sgd (4 steps): within 1e-5.  zo-sgd (4 steps, lenet defaults): a loss differs by
  at most ~2 ulp(2.3) = 4.8e-7, so a scalar c = (L+ - L-) / 2 eps by <= 4.8e-4; times lr 1e-3, the
  block-size step rule's largest factor (62008 / 458 = 135) and |z| <= 6, that bounds the weights at
  3.9e-4 per step, 2e-3 over 4 steps (measured: 6.6e-5).
* Replicas: the run itself gathers every rank's weight hash and fails if they differ; the summary's
  hash must equal the hash of the saved weights.
* Zeroth-order bytes per step do not depend on the model size (lenet vs resnet20); first-order bytes do;
  zo's are per example and per site of the block cut.
* A rank that dies: clear message, last checkpoint intact; with --max-restarts the job resumes from it
  and ends bit-identical to an uninterrupted 2-rank run.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import real_archive
from subgrad.models import build_model
from subgrad.run_folder import load_checkpoint
from subgrad.training.distributed import weights_hash
from subgrad.training.optimizers import REGISTRY

pytestmark = pytest.mark.slow  # every test here runs torchrun with several processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--model", "lenet", "--device", "cpu", "--batch-size", "64", "--eval-every", "2", "--quiet"]


def _train(out, optimizer, *extra, nproc=1) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "subgrad",
        "train",
        "--optimizer",
        optimizer,
        "--data",
        str(real_archive()),
        "--out",
        str(out),
        *COMMON,
        *map(str, extra),
    ]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _weights(run) -> dict:
    return torch.load(pathlib.Path(run) / "model.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("optimizer, atol", [("sgd", 1e-5), ("zo-sgd", 2e-3), ("zo", 2 * 4 * 1e-3)])
def test_two_ranks_equal_one_rank(tmp_path, optimizer, atol):
    single, double = tmp_path / "one", tmp_path / "two"
    extra = ("--steps", 4) if optimizer == "sgd" else ("--steps", 4, "--lr", 1e-3)
    for out, n in ((single, 1), (double, 2)):
        res = _train(out, optimizer, *extra, nproc=n)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(single), _weights(double)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"{optimizer}: 2-rank weights differ from 1-rank by {worst} > {atol}"
    summary = json.loads((double / "summary.json").read_text())
    assert summary["world_size"] == 2
    # the run compared all ranks' hashes before writing; the recorded hash is that of the saved weights
    model = build_model("lenet")
    model.load_state_dict(b)
    assert summary["weights_sha256"] == weights_hash(model)
    if optimizer == "zo-sgd":  # lenet default: 5 module blocks x 2 central-difference losses x float64
        assert summary["bytes_communicated_per_step"] == 5 * 2 * 8
    elif optimizer == "zo":  # per example of this rank's 32: a float32 loss difference per site and
        # direction (lenet's defaults: q on conv1 and conv2, q_linear on fc1-fc3), and per head (4)
        row = REGISTRY["zo"].defaults["lenet"]
        assert summary["bytes_communicated_per_step"] == 4 * 32 * (2 * row["q"] + 3 * row["q_linear"] + 4)
    else:  # the flat float32 gradient
        assert summary["bytes_communicated_per_step"] == 4 * sum(v.numel() for v in b.values())
    # resuming with another world size is refused with the reason
    res = subprocess.run(
        [sys.executable, "-m", "subgrad", "train", "--resume", str(double), "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 2 and "2-process run" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def _bytes_per_step(model: str, optimizer: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "benchmarks" / "distributed.py"),
        "--worker",
        "--model",
        model,
        "--optimizer",
        optimizer,
        "--steps",
        "2",
        "--batch",
        "8",
        "--device",
        "cpu",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][0])


def test_zeroth_order_traffic_is_independent_of_model_size():
    lenet, resnet = _bytes_per_step("lenet", "zo-sgd"), _bytes_per_step("resnet20", "zo-sgd")
    assert resnet["parameters"] > 4 * lenet["parameters"]
    assert lenet["bytes_per_step"] == resnet["bytes_per_step"] == 16, (lenet, resnet)
    assert lenet["replicas_identical"] and resnet["replicas_identical"]
    first_order = _bytes_per_step("lenet", "sgd")
    assert first_order["bytes_per_step"] == 4 * lenet["parameters"] and first_order["replicas_identical"]
    # zo: per example of the rank's 4, a float32 loss difference per site and head (lenet 5 + 4, resnet20
    # 20 + 10): set by the depth of the block cut, not by the parameter count
    lenet, resnet = _bytes_per_step("lenet", "zo"), _bytes_per_step("resnet20", "zo")
    assert (lenet["bytes_per_step"], resnet["bytes_per_step"]) == (4 * 4 * 9, 4 * 4 * 30), (lenet, resnet)
    assert lenet["replicas_identical"] and resnet["replicas_identical"]


def test_dead_rank_leaves_checkpoint_and_restart_resumes_exactly(tmp_path):
    args = ("--steps", 6, "--lr", 1e-3, "--checkpoint-every", 2)
    reference, crashed, restarted = tmp_path / "ref", tmp_path / "crash", tmp_path / "restart"
    assert _train(reference, "zo-sgd", *args, nproc=2).returncode == 0

    env_cmd = [
        sys.executable,
        "-m",
        "subgrad",
        "train",
        "--optimizer",
        "zo-sgd",
        "--data",
        str(real_archive()),
        *COMMON,
        *map(str, args),
        "--nproc",
        "2",
    ]
    env = dict(os.environ, SUBGRAD_FAIL_AT="1:3")
    res = subprocess.run([*env_cmd, "--out", str(crashed)], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode != 0 and "a rank failed" in res.stderr and f"--resume {crashed}" in res.stderr
    names = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert names == ["step-0000002.pt"], names  # complete checkpoints only, no temp files
    assert load_checkpoint(crashed / "checkpoints" / names[0])["step"] == 2

    res = subprocess.run(
        [*env_cmd, "--out", str(restarted), "--max-restarts", "1"], capture_output=True, text=True, timeout=900, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(reference), _weights(restarted)
    assert all(torch.equal(a[k], b[k]) for k in a), "restarted run is not bit-identical to the uninterrupted one"
