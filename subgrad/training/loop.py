"""``subgrad train``: CIFAR-10 training with any subgrad optimizer, resumable, into a run folder.

Run folder (``--out``):
  config.json     everything needed to reproduce the run (all resolved hyperparameters)
  metrics.jsonl   one line per evaluation: step, epoch, train_loss, test_loss, test/train accuracy, ...
  summary.json    test_accuracy, train_accuracy (fractions), train_seconds, device, forward passes, versions
  curves.png      loss and accuracy against steps
  checkpoints/step-NNNNNNN.pt   {"model", "optimizer", "step", ...}, written atomically (temp + rename)
  model.pt        the final checkpoint

Everything random is a function of ``--seed`` and the step: the model init, the batch order (per epoch),
the augmentation (per batch) and the zeroth-order directions (in the optimizer state), so a run resumed
from a checkpoint ends bit-identical to an uninterrupted one on the same device.

Under ``torchrun`` (or ``subgrad train --nproc N``) the same loop runs data-parallel: every rank draws
the same global batch and trains on its shard; gradients (first-order) or the step's losses
(zeroth-order) are averaged over ranks, or for ``zo`` the per-example loss differences of each rank's
share of the perturbed passes are gathered (``subgrad.training.distributed``); only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import pathlib
import platform
import signal
import sys
import time

import torch

from ..capture import CudaGraphStep
from ..devices import pick_device
from ..kernels import prepare_cpu_twin
from ..run_folder import atomic_save, atomic_write, atomic_write_text, versions
from .config import TrainConfig
from .distributed import from_environment, restarted_after_failure, shutdown, weights_hash, with_failure_drill
from .run_setup import (
    TrainingRun,
    checkpoint,
    evaluate,
    load_last_checkpoint,
    save_checkpoint,
    setup,
)
from .step import TrainStep, graph_refusal


def plot_curves(metrics: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, [m["train_loss"] for m in metrics], label="train (running)")
    ax1.plot(steps, [m["test_loss"] for m in metrics], label="test")
    ax1.set_xlabel("step"), ax1.set_ylabel("cross-entropy"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(steps, [m["train_accuracy"] for m in metrics], label="train")
    ax2.plot(steps, [m["test_accuracy"] for m in metrics], label="test")
    ax2.set_xlabel("step"), ax2.set_ylabel("accuracy"), ax2.legend(), ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def evaluate_and_log(s: TrainingRun, step: int, train_seconds: float, loss_sum: torch.Tensor, loss_count: int) -> dict:
    """Test and train accuracy now; one metrics row, appended to metrics.jsonl and printed."""
    s.comm.sync_buffers_(s.model)  # BatchNorm statistics: one average per evaluation
    test_loss, test_acc = evaluate(s.model, s.test_loader, s.amp, s.comm)
    _, train_acc = evaluate(s.model, s.train_eval, s.amp, s.comm)
    mean_loss = torch.stack([loss_sum, torch.tensor(float(loss_count), dtype=torch.float64, device=s.device)])
    if s.step_kind == "backprop":  # forward-only steps return the global batch's loss already
        s.comm.all_reduce_mean_(mean_loss)
    forward_only = s.step_kind != "backprop"
    fwd = s.optimizer.forward_passes if forward_only else step
    row = dict(
        step=step,
        epoch=round(step / s.steps_per_epoch, 3),
        train_loss=mean_loss[0].item() / max(1.0, mean_loss[1].item()),
        test_loss=test_loss,
        test_accuracy=test_acc,
        train_accuracy=train_acc,
        lr=float(s.optimizer.param_groups[0]["lr"]),
        train_seconds=round(train_seconds, 2),
        images_per_second=step * s.cfg.batch_size / max(train_seconds, 1e-9),
        forward_passes=fwd,
    )
    if s.val_loader is not None:
        row["val_loss"], row["val_accuracy"] = evaluate(s.model, s.val_loader, s.amp, s.comm)
    if s.writes:
        with open(s.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if not s.quiet:  # tqdm.write clears and redraws a live bar; without one it is a plain print
        from tqdm import tqdm

        tqdm.write(
            f"step {step:>7}  epoch {row['epoch']:>6.2f}  loss {row['train_loss']:.4f}  "
            f"test loss {test_loss:.4f}  test acc {test_acc:.4f}  train acc {train_acc:.4f}  "
            + (f"val acc {row['val_accuracy']:.4f}  " if "val_accuracy" in row else "")
            + f"{row['images_per_second']:.0f} img/s"
            + (f"  {fwd / max(train_seconds, 1e-9):.0f} fwd/s" if forward_only else "")
            + f"  {train_seconds:.0f} s",
            file=sys.stderr,
        )
    return row


# -- the loop ---------------------------------------------------------------------------------------
class _StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the loop to stop at the next step boundary (a
    zeroth-order step holds perturbed weights mid-step, which must never reach a checkpoint); a second
    signal stops at once, without a checkpoint."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Train per ``config`` into ``config.out``; with ``resume`` continue from the run's last checkpoint.

    Under torchrun every rank calls this; rank 0 alone writes files.  A torchrun restart
    (``--max-restarts``) resumes from the last complete checkpoint by itself.
    """
    cfg = config.resolved()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    kind = pick_device(cfg.device).type
    comm = from_environment(kind)
    try:
        refusal = graph_refusal(kind, comm)
        if cfg.cuda_graph == "on" and refusal:
            raise ValueError(f"--cuda-graph on: {refusal}; use --cuda-graph auto (capture where possible) or off")
        out = pathlib.Path(cfg.out)
        s = setup(cfg, out, comm, kind)
        start, train_seconds, metrics = (
            load_last_checkpoint(s) if resume or restarted_after_failure(out) else (0, 0.0, [])
        )
        return run_loop(s, start, train_seconds, metrics, refusal)
    finally:
        shutdown(comm)


def step_runner(s: TrainingRun, start: int, refusal: str | None) -> tuple[TrainStep, object]:
    """The trainer's step from ``start`` and what runs it: a CUDA graph of it where it can be captured
    (``--cuda-graph``), else the step itself, behind the failure drill when one is set."""
    from ..optim import ZOOptimizer

    if (
        s.device.type == "cpu"
        and isinstance(s.optimizer, ZOOptimizer)
        and s.optimizer.settings.distribution == "gaussian"
    ):
        # compile the CPU twin of normal directions before the clock starts, not inside the first step
        if not s.quiet:
            print(
                "preparing the compiled CPU twin of normal directions (torch.compile: ~15 s the first time "
                "on a machine, cached after)",
                file=sys.stderr,
                flush=True,
            )
        prepare_cpu_twin()
    train_step = TrainStep(s, start)
    run = train_step
    if s.cfg.cuda_graph != "off" and refusal is None:
        run = CudaGraphStep(train_step)
    elif s.cfg.cuda_graph == "auto" and s.device.type == "cuda" and not s.quiet:
        print(f"--cuda-graph auto: steps run uncaptured ({refusal})", file=sys.stderr)
    return train_step, with_failure_drill(run, s.comm)


def progress_bar(s: TrainingRun, start: int):
    """A live bar only on a terminal: redirected to a file, its redraws would be almost all of the log, so
    there the per-evaluation lines are the progress report."""
    from tqdm import tqdm

    cfg = s.cfg
    if not s.quiet:
        tqdm.write(
            f"{cfg.model}/{cfg.optimizer}: steps {start}..{s.total}, batch {cfg.batch_size}, "
            f"{s.steps_per_epoch} steps per epoch, evaluating every {s.eval_every} steps",
            file=sys.stderr,
        )
    return tqdm(
        total=s.total,
        initial=start,
        disable=s.quiet or not sys.stderr.isatty(),
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        desc=f"{cfg.model}/{cfg.optimizer}" + (f" x{s.comm.world_size}" if s.comm.active else ""),
    )


class _StopAtBoundary(Exception):
    pass


def run_loop(s: TrainingRun, start: int, train_seconds: float, metrics: list[dict], refusal: str | None) -> dict:
    """Steps from ``start`` to ``s.total``, evaluating (and checkpointing) on schedule; then :func:`finish`.
    A first SIGINT/SIGTERM checkpoints at the next step boundary and raises KeyboardInterrupt; a second
    stops at once, without a checkpoint (the last complete one stays intact)."""
    train_step, run_step = step_runner(s, start, refusal)
    if s.writes:
        (s.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(s.out / "config.json", json.dumps(s.record, indent=1))
        atomic_write_text(s.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    bar = progress_bar(s, start)
    last_eval = metrics[-1] if metrics else None
    loss_count = step_bytes = 0  # steps since the last evaluation; payload bytes of the steps' collectives
    step, stop = start, _StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        tick = time.perf_counter()
        while step < s.total:
            train_step.prepare(step)
            sent_before = s.comm.bytes_sent
            run_step(step)
            step_bytes += s.comm.bytes_sent - sent_before
            loss_count, step = loss_count + 1, step + 1
            bar.update(1)
            if step % s.eval_every == 0 or step == s.total:
                train_seconds += seconds_since(tick, s.device)
                last_eval = evaluate_and_log(s, step, train_seconds, train_step.loss_sum, loss_count)
                metrics.append(last_eval)
                train_step.loss_sum.zero_()
                loss_count = 0
                bar.set_postfix(loss=f"{last_eval['train_loss']:.3f}", acc=f"{last_eval['test_accuracy']:.3f}")
                if step % s.checkpoint_every == 0 or step == s.total:
                    save_checkpoint(s, step, train_seconds)
                tick = time.perf_counter()
            if stop.requested and step < s.total:
                raise _StopAtBoundary
    except _StopAtBoundary:
        bar.close()
        path = save_checkpoint(s, step, train_seconds + seconds_since(tick, s.device))
        if s.writes:
            print(
                f"interrupted at step {step}: checkpoint written to {path}; continue with "
                f"`subgrad train --resume {s.out}`",
                file=sys.stderr,
            )
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:
        bar.close()
        if s.writes:
            print(
                f"stopped at once during step {step + 1} (second signal): no checkpoint written; the last "
                f"complete one in {s.out / 'checkpoints'} is intact",
                file=sys.stderr,
            )
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
    return finish(s, step, start, train_seconds, metrics, last_eval, step_bytes)


def seconds_since(tick: float, device: torch.device) -> float:
    """Wall seconds since ``tick``, after the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tick


def finish(
    s: TrainingRun, step: int, start: int, train_seconds: float, metrics: list[dict], last_eval: dict, step_bytes: int
) -> dict:
    """Check the replicas agree, write model.pt, summary.json and curves.png; return the summary."""
    s.comm.sync_buffers_(s.model)
    hashes = s.comm.all_gather_strings(weights_hash(s.model))
    if len(set(hashes)) != 1:
        raise RuntimeError(f"replicas diverged: weight hashes differ across ranks ({hashes}); this is a bug")
    cfg, device = s.cfg, s.device
    summary = dict(
        model=cfg.model,
        optimizer=cfg.optimizer,
        test_accuracy=last_eval["test_accuracy"],
        train_accuracy=last_eval["train_accuracy"],
        test_loss=last_eval["test_loss"],
        train_seconds=round(train_seconds, 2),
        steps=step,
        epochs=round(step / s.steps_per_epoch, 3),
        images_per_second=last_eval["images_per_second"],
        forward_passes=last_eval["forward_passes"],
        device=str(device),
        device_name=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        versions=versions(),
        data=s.data_source,
        world_size=s.comm.world_size,
        bytes_communicated_per_step=step_bytes / max(1, step - start),
        weights_sha256=hashes[0],
    )
    if "val_accuracy" in last_eval:
        summary.update(
            val_accuracy=last_eval["val_accuracy"], val_loss=last_eval["val_loss"], validation_images=cfg.validation
        )
    if s.writes:
        atomic_save(checkpoint(s, step, train_seconds), s.out / "model.pt")
        atomic_write_text(s.out / "summary.json", json.dumps(summary, indent=1))
        plot_curves(metrics, s.out / "curves.png", f"{cfg.model} / {cfg.optimizer}")
    if not s.quiet:
        print(
            f"test accuracy {summary['test_accuracy']:.4f}, train accuracy {summary['train_accuracy']:.4f}, "
            f"{summary['train_seconds']:.0f} s; run folder {s.out}",
            file=sys.stderr,
        )
    return summary
