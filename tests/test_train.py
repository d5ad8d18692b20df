"""End-to-end `subgrad train` on CPU with real CIFAR-10: accuracy, run folder, resume, interruption."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import real_archive
from subgrad.models import build_model
from subgrad.run_folder import latest_checkpoint, load_checkpoint
from subgrad.training import step as training_step
from subgrad.training.config import TrainConfig
from subgrad.training.loop import train
from subgrad.training.optimizers import REGISTRY

pytestmark = pytest.mark.slow  # every test here trains on the real archive and runs `subgrad train` in subprocesses


def _cli(*args):
    return [sys.executable, "-m", "subgrad", "train", *map(str, args)]


def _run(args, tmp_path, timeout=600):
    out = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def _weights_hash(path) -> str:
    state = torch.load(path, weights_only=True)["model"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_first_order_run_beats_chance_and_writes_the_run_folder(tmp_path):
    run = tmp_path / "sgd"
    out = _run(
        ["--model", "lenet", "--optimizer", "sgd", "--data", real_archive(), "--out", run, "--epochs", 1, "--quiet"],
        tmp_path,
    )
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert printed["test_accuracy"] == summary["test_accuracy"] >= 0.35  # chance is 0.10
    for key in ("test_accuracy", "train_accuracy", "train_seconds", "device", "forward_passes", "versions"):
        assert key in summary, key
    assert 0 <= summary["train_accuracy"] <= 1 and summary["versions"]["torch"] == torch.__version__
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "lenet" and config["lr"] == REGISTRY["sgd"].defaults["lenet"]["lr"] and config["mean"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == summary["steps"]
    assert {"step", "test_accuracy", "train_loss", "test_loss", "images_per_second"} <= set(metrics[-1])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert set(ckpt["model"]) == set(build_model("lenet").state_dict())
    assert list((run / "checkpoints").glob("step-*.pt"))


def test_zeroth_order_run_beats_chance(tmp_path):
    run = tmp_path / "zo"
    _run(
        [
            "--model",
            "lenet",
            "--optimizer",
            "zo-sgd",
            "--data",
            real_archive(),
            "--out",
            run,
            "--steps",
            400,
            "--schedule",
            "constant",
            "--quiet",
        ],
        tmp_path,
    )
    summary = json.loads((run / "summary.json").read_text())
    # chance (and an untrained LeNet) is 0.10.  400 steps, not 200: at 200 the run is still leaving its early
    # plateau and the result depends on the direction seeds (15-bit normal map, seeds 0 / 1 / 2: 13.1% /
    # 17.3% / 16.6%); at 400 steps seed 0 reaches 24.8% (2-core VM, 2026-11-29)
    assert summary["test_accuracy"] >= 0.18, summary
    assert summary["forward_passes"] == 400 * 5 * 2  # steps x module blocks x (plus, minus)


def test_activity_perturbation_run_beats_chance(tmp_path):
    """`--optimizer zo` (ActivityZO) on the real archive, 200 steps at its LeNet defaults but a constant lr,
    with a validation split: it learns, and the split is reported."""
    run = tmp_path / "zo"
    _run(
        [
            "--model",
            "lenet",
            "--optimizer",
            "zo",
            "--data",
            real_archive(),
            "--out",
            run,
            "--steps",
            200,
            "--schedule",
            "constant",
            "--validation",
            5000,
            "--quiet",
        ],
        tmp_path,
    )
    summary = json.loads((run / "summary.json").read_text())
    # chance is 0.10; the bar leaves room for the machine and seed
    assert summary["test_accuracy"] >= 0.19 and summary["val_accuracy"] >= 0.19, summary
    row = REGISTRY["zo"].defaults["lenet"]  # a step: one clean pass and max(q, q_linear) perturbed ones
    assert summary["forward_passes"] == 200 * (1 + max(row["q"], row["q_linear"]))
    assert summary["validation_images"] == 5000
    config = json.loads((run / "config.json").read_text())
    assert config["validation"] == 5000 and config["estimator"] is None  # settings zo has no use for stay unset


def _interrupt_at(monkeypatch, step_to_stop):
    """Ctrl-C during step ``step_to_stop - 1``: training finishes that step, checkpoints, stops."""
    real = training_step.lr_factor

    def factor(schedule, step, total):
        if step == step_to_stop - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(schedule, step, total)

    monkeypatch.setattr(training_step, "lr_factor", factor)  # read by TrainStep.prepare


@pytest.mark.parametrize("optimizer, steps, stop", [("sgd", 30, 13), ("zo-sgd", 30, 17), ("zo", 30, 17)])
def test_interrupted_then_resumed_run_is_bit_identical(optimizer, steps, stop, tmp_path, monkeypatch):
    base = dict(
        model="lenet",
        optimizer=optimizer,
        data=str(real_archive()),
        steps=steps,
        eval_every=10,
        batch_size=64,
        quiet=True,
    )
    train(TrainConfig(out=str(tmp_path / "straight"), **base))

    with monkeypatch.context() as m:
        _interrupt_at(m, stop)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "resumed"), **base))
    assert (tmp_path / "resumed" / "checkpoints" / f"step-{stop:07d}.pt").exists()
    train(TrainConfig(out=str(tmp_path / "resumed"), **base), resume=True)
    assert _weights_hash(tmp_path / "straight" / "model.pt") == _weights_hash(tmp_path / "resumed" / "model.pt")
    metrics = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [10, 20, 30]


def test_ctrl_c_writes_a_checkpoint_and_cli_resume_finishes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(
            "--optimizer",
            "sgd",
            "--data",
            real_archive(),
            "--out",
            run,
            "--steps",
            4000,
            "--eval-every",
            50,
            "--batch-size",
            32,
            "--quiet",
        ),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint written" in err and "--resume" in err
    step = int(latest_checkpoint(run).stem.split("-")[1])
    assert 50 <= step < 4000
    _run(["--resume", run, "--steps", step + 20, "--quiet"], tmp_path)
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 20


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    run = tmp_path / "run"
    train(
        TrainConfig(
            model="lenet", optimizer="sgd", data=str(real_archive()), out=str(run), steps=5, batch_size=32, quiet=True
        )
    )
    ckpt = latest_checkpoint(run)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable .*truncated"):
        train(
            TrainConfig(
                model="lenet",
                optimizer="sgd",
                data=str(real_archive()),
                out=str(run),
                steps=10,
                batch_size=32,
                quiet=True,
            ),
            resume=True,
        )
    torch.save({"weights": torch.zeros(1)}, ckpt)
    with pytest.raises(ValueError, match="not a subgrad checkpoint"):
        load_checkpoint(ckpt)
    out = subprocess.run(_cli("--resume", run, "--steps", 10), capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a subgrad checkpoint" in out.stderr


def test_bad_flags_give_one_line_errors(tmp_path):
    out = subprocess.run(
        _cli("--data", tmp_path / "missing.tar.gz", "--out", tmp_path / "r", "--lr", "-1"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "--lr must be > 0" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        _cli("--data", tmp_path / "empty", "--out", tmp_path / "r", "--steps", 1),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and "not in a known layout" in out.stderr


def test_per_pair_defaults_and_explicit_flags():
    """`None` takes the model/optimizer default (zo-adam on lenet: Rademacher directions, forward
    differences); an explicit value always wins; other pairs fall back to central differences, and to the
    optimizers' own distribution rule (gaussian for q = 1, rademacher for q > 1)."""
    from subgrad.training.config import TrainConfig
    from subgrad.training.run_setup import make_optimizer

    cfg = TrainConfig(model="lenet", optimizer="zo-adam").resolved()
    assert (cfg.distribution, cfg.estimator, cfg.q) == ("rademacher", "forward", 4)
    explicit = TrainConfig(model="lenet", optimizer="zo-adam", distribution="gaussian").resolved()
    assert explicit.distribution == "gaussian"
    cfg = TrainConfig(model="lenet", optimizer="zo-sgd").resolved()
    assert (cfg.distribution, cfg.estimator) == (None, "central")
    from subgrad.models import build_model

    assert make_optimizer(cfg, build_model("lenet")).settings.distribution == "gaussian"
    cfg = TrainConfig(model="lenet", optimizer="zo-sgd", q=2).resolved()
    assert make_optimizer(cfg, build_model("lenet")).settings.distribution == "rademacher"
