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
share of the perturbed passes are gathered (``subgrad.distributed``); only rank 0 writes the run folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .config import (DEFAULTS, ESTIMATOR_OPTIMIZERS, FO_OPTIMIZERS, OPTIMIZERS,  # noqa: F401 (names train.py
                     SCHEDULES, ZO_OPTIMIZERS, TrainConfig)  # had before config.py: re-exported for existing imports)
from .data import Dataset, DeviceLoader, load_cifar10
from .capture import CudaGraphStep
from .distributed import Communicator, from_environment, shutdown, weights_hash
from .kernels import prepare_cpu_twin
from .models import build_model
from .runs import (CHECKPOINT_FORMAT, atomic_save, atomic_write, atomic_write_text, checkpoints, latest_checkpoint,
                   load_checkpoint)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    t = step / max(1, total)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":  # linear warm-up over 20%, then linear decay to 0
        return t / 0.2 if t < 0.2 else max(0.0, (1 - t) / 0.8)
    return 1.0


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, replicas: Communicator | None = None):
    """The optimizer ``cfg`` names, for ``model``; with ``replicas`` it exchanges with the other ranks what its
    family needs (gradients, a step's losses, or per-example loss differences: subgrad.optim.replicas)."""
    from . import optim

    named = list(model.named_parameters())
    if cfg.optimizer == "zo":
        return optim.ActivityZO(model, lr=cfg.lr, eps=cfg.eps, q=cfg.q, weight_decay=cfg.weight_decay, seed=cfg.seed,
                                replicas=replicas)
    if cfg.optimizer == "sgd":
        return optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         replicas=replicas)
    if cfg.optimizer == "adamw":
        # capturable: the step count lives on the device, so the trainer's step can be a CUDA graph
        return optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=True,
                           replicas=replicas)
    blocks = None if cfg.blocks == "none" else cfg.blocks  # the optimizers' None: one block, the whole model
    clip = None if cfg.clip == "off" else cfg.clip
    common = dict(lr=cfg.lr, eps=cfg.eps, q=cfg.q, distribution=cfg.distribution, blocks=blocks, clip=clip,
                  weight_decay=cfg.weight_decay, seed=cfg.seed, scale_by_block_size=cfg.scale_by_block_size,
                  replicas=replicas)
    if cfg.optimizer == "zo-sgd":
        return optim.ZOSGD(named, estimator=cfg.estimator, momentum=cfg.momentum, **common)
    if cfg.optimizer == "zo-adam":
        return optim.ZOAdam(named, estimator=cfg.estimator, **common)
    return optim.HiZOO(named, momentum=cfg.momentum, **common)


# -- run folder -------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"subgrad": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


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


# -- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader: DeviceLoader, amp: bool, comm: Communicator | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader, in eval mode; with ``comm``, each rank's loader holds its
    share of the images and the sums are added over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=loader.device)  # loss, correct, images
    for x, y in loader.epoch(0):
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
    sums[2] = loader.num_images
    model.train(was_training)
    if comm is not None:
        comm.all_reduce_sum_(sums)
    loss, correct, n = sums.tolist()
    return loss / n, correct / n


# -- setup ------------------------------------------------------------------------------------------
@dataclass
class Session:
    """What one training process holds once set up (:func:`setup`); the loop reads it top to bottom."""
    cfg: TrainConfig
    out: pathlib.Path
    comm: Communicator
    device: torch.device
    amp: bool  # bfloat16 autocast (CUDA only)
    step_kind: str  # "backprop"; "closure" (zo-sgd, zo-adam, hizoo: the step runs a loss closure); "blocks"
    # (zo: the optimizer runs the model block by block on the batch).  The last two are forward-only.
    writes: bool  # this rank writes the run folder (rank 0)
    quiet: bool
    steps_per_epoch: int
    total: int  # steps of the whole run
    eval_every: int
    checkpoint_every: int
    train_loader: DeviceLoader
    test_loader: DeviceLoader  # this rank's share of the test set
    train_eval: DeviceLoader  # this rank's share of every 5th training image (train accuracy)
    val_loader: DeviceLoader | None  # this rank's share of the held-out training images (--validation)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: list  # each param group's lr before the schedule (and before a resume loads scheduled ones)
    record: dict  # config.json: the resolved settings and what the run derived from the data
    data_source: str  # where the images came from (summary.json)


def setup(cfg: TrainConfig, out: pathlib.Path, comm: Communicator, kind: str, data: Dataset | None = None) -> Session:
    """Device, data (``cfg.data``, unless a loaded ``data`` is given), model and optimizer of a run, seeded
    from ``cfg.seed``."""
    device = torch.device(kind, comm.local_rank) if kind == "cuda" and comm.active else torch.device(kind)
    if device.type == "cuda":
        # Exact resume needs the same bits every run; cuDNN may otherwise pick autotuned or atomic-add
        # convolution backward algorithms that differ from run to run.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if cfg.batch_size % comm.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
                         f"({comm.world_size}): every rank trains on an equal shard of each batch")
    data = data if data is not None else load_cifar10(cfg.data)
    mean, std = data.channel_stats()  # of the whole training set, held-out images included
    train_images, train_labels, val_images, val_labels = validation_split(data.train_images, data.train_labels,
                                                                          cfg.validation)
    steps_per_epoch = len(train_labels) // cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    step_kind = "blocks" if cfg.optimizer == "zo" else "closure" if cfg.optimizer in ZO_OPTIMIZERS else "backprop"
    eval_every = cfg.eval_every or (max(1, total // 10) if step_kind != "backprop" else steps_per_epoch)
    train_loader = DeviceLoader(train_images, train_labels, mean, std, cfg.batch_size, device,
                                augment=cfg.augment, shuffle=True, drop_last=True, order_seed=cfg.seed,
                                augment_seed=cfg.seed + 1)
    # evaluation: each rank its strided share; every 5th training image (10,000 of all classes; the archive
    # is sorted by class) for train accuracy
    r, w = comm.rank, comm.world_size
    test_loader = DeviceLoader(data.test_images[r::w], data.test_labels[r::w], mean, std, 1000, device)
    train_eval = DeviceLoader(train_images[::5][r::w], train_labels[::5][r::w], mean, std, 1000, device)
    val_loader = (DeviceLoader(val_images[r::w], val_labels[r::w], mean, std, 1000, device)
                  if cfg.validation else None)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(cfg, model, comm if comm.active else None)
    record = dict(dataclasses.asdict(cfg), steps_total=total, steps_per_epoch=steps_per_epoch, mean=mean, std=std,
                  classes=list(data.classes), model_config={}, device_resolved=str(device), world_size=w)
    return Session(cfg=cfg, out=out, comm=comm, device=device, amp=cfg.amp and device.type == "cuda",
                   step_kind=step_kind, writes=comm.is_main, quiet=cfg.quiet or not comm.is_main,
                   steps_per_epoch=steps_per_epoch, total=total, eval_every=eval_every,
                   checkpoint_every=cfg.checkpoint_every or eval_every, train_loader=train_loader,
                   test_loader=test_loader, train_eval=train_eval, val_loader=val_loader, model=model,
                   optimizer=optimizer, base_lrs=[g["lr"] for g in optimizer.param_groups], record=record,
                   data_source=str(data.source))


#: The held-out subset is drawn from this seed, not from --seed, so runs with different seeds are
#: compared on the same validation images.
VALIDATION_SEED = 20260101


def validation_split(images, labels, count: int):
    """(train images, train labels, validation images, validation labels): ``count`` training images
    drawn at random (seeded by VALIDATION_SEED) held out; both parts keep the archive's order."""
    if not count:
        return images, labels, images[:0], labels[:0]
    if count >= len(labels):
        raise ValueError(f"--validation {count} leaves no training images: the training set has {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VALIDATION_SEED)).numpy()
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    return images[kept], labels[kept], images[held], labels[held]


def resume_config(run: str | pathlib.Path, steps: int | None = None, epochs: float | None = None,
                  quiet: bool = False) -> TrainConfig:
    """The config to continue the run in folder ``run`` (``subgrad train --resume RUN``); a new ``steps``
    or ``epochs`` replaces the saved training length."""
    saved = pathlib.Path(run) / "config.json"
    if not saved.is_file():
        raise ValueError(f"--resume {run}: no config.json there; is it a run folder?")
    config = TrainConfig.from_record(json.loads(saved.read_text()))
    config.out = str(run)
    if steps is not None or epochs is not None:
        config.steps, config.epochs = steps, epochs
    config.quiet = quiet or config.quiet
    return config


def load_last_checkpoint(s: Session) -> tuple[int, float, list[dict]]:
    """Restore model and optimizer from the run's last checkpoint: (step, train_seconds, metrics so far)."""
    ckpt_path = latest_checkpoint(s.out)
    ckpt = load_checkpoint(ckpt_path)
    cfg, w = s.cfg, s.comm.world_size
    if ckpt["config"]["model"] != cfg.model or ckpt["config"]["optimizer"] != cfg.optimizer:
        raise ValueError(f"checkpoint {ckpt_path} is a {ckpt['config']['model']}/{ckpt['config']['optimizer']} "
                         f"run, not {cfg.model}/{cfg.optimizer}")
    saved_world = ckpt.get("world_size", 1)
    if saved_world != w:
        raise ValueError(f"checkpoint {ckpt_path} was written by a {saved_world}-process run and this one has {w}; "
                         f"resume with the same number of processes (--nproc {saved_world}), because the "
                         "shard sums would round differently and the run would not be exact")
    s.model.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    metrics = []
    if (s.out / "metrics.jsonl").exists():
        metrics = [m for m in map(json.loads, (s.out / "metrics.jsonl").read_text().splitlines())
                   if m["step"] <= ckpt["step"]]
    return ckpt["step"], ckpt["train_seconds"], metrics


def checkpoint(s: Session, step: int, train_seconds: float) -> dict:
    """The checkpoint format (``subgrad.runs.CHECKPOINT_FORMAT``): periodic checkpoints and model.pt alike."""
    return dict(format=CHECKPOINT_FORMAT, model=s.model.state_dict(), optimizer=s.optimizer.state_dict(), step=step,
                train_seconds=train_seconds, config=dataclasses.asdict(s.cfg), world_size=s.comm.world_size)


def save_checkpoint(s: Session, step: int, train_seconds: float) -> pathlib.Path:
    """checkpoints/step-NNNNNNN.pt (rank 0 only: replicas are identical); keeps the last three."""
    path = s.out / "checkpoints" / f"step-{step:07d}.pt"
    if s.writes:
        atomic_save(checkpoint(s, step, train_seconds), path)
        for old in checkpoints(s.out)[:-3]:
            old.unlink(missing_ok=True)
    return path


# -- one step, one evaluation -----------------------------------------------------------------------
class TrainStep:
    """One training step whose every input lives on the device, so that a CUDA graph can capture it.

    Between steps the host writes only what changes on its own schedule: the epoch's image order (once
    per epoch) and each param group's learning rate (one fill each), in :meth:`prepare`.  The step itself
    gathers and augments its batch from the device step counter (:meth:`DeviceLoader.gather`), runs the
    forward passes (and the backward pass, first-order) and the optimizer step, and adds its loss to
    ``loss_sum``; it reads nothing back, so eager and graphed steps are the same launches.
    """

    def __init__(self, s: Session, start: int):
        self.s = s
        device = s.device
        self.counter = torch.tensor([start], dtype=torch.int64, device=device)  # global step, advanced by gather
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)  # the step's augmentation seed
        self.order = torch.empty(s.train_loader.num_images, dtype=torch.int64, device=device)
        self.epoch: int | None = None
        #: the loss summed over the steps since the last evaluation (read there, then zeroed)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.lrs = [torch.tensor(float(base), dtype=torch.float32, device=device) for base in s.base_lrs]
        for group, lr in zip(s.optimizer.param_groups, self.lrs):
            group["lr"] = lr  # read by the update kernels at every step

    def prepare(self, step: int) -> None:
        """Host writes before step ``step``: the epoch's order when a new epoch starts, and the lr."""
        s = self.s
        epoch = step // s.steps_per_epoch
        if epoch != self.epoch:
            self.order.copy_(s.train_loader.order(epoch))
            self.epoch = epoch
        factor = lr_factor(s.cfg.schedule, step, s.total)
        for lr, base in zip(self.lrs, s.base_lrs):
            lr.fill_(base * factor)

    def __call__(self) -> None:
        s = self.s
        x, y = s.train_loader.gather(self.order, self.counter, self.seed)
        s.model.train()
        if s.step_kind == "blocks":  # every rank's clean pass sees the whole batch; the optimizer splits the tails
            loss = s.optimizer.step(x, y)
        else:
            x, y = s.comm.shard(x), s.comm.shard(y)
            autocast = dict(device_type=s.device.type, dtype=torch.bfloat16, enabled=s.amp, cache_enabled=False)
            if s.step_kind == "closure":
                def closure():
                    with torch.autocast(**autocast):
                        return F.cross_entropy(s.model(x).float(), y)
                loss = s.optimizer.step(closure)
            else:
                s.optimizer.zero_grad(set_to_none=False)
                with torch.autocast(**autocast):
                    loss = F.cross_entropy(s.model(x).float(), y)
                loss.backward()
                s.optimizer.step()  # averages the flat gradient buffer over its replicas first
        self.loss_sum += loss.detach().double()


def graph_refusal(kind: str, comm: Communicator) -> str | None:
    """Why the training step cannot be a CUDA graph on device ``kind`` with ``comm``, or None."""
    if kind != "cuda":
        return f"training on {kind}, not CUDA"
    if comm.active:
        return "data-parallel collectives (torchrun) are not captured"
    return None


def evaluate_and_log(s: Session, step: int, train_seconds: float, loss_sum: torch.Tensor, loss_count: int) -> dict:
    """Test and train accuracy now; one metrics row, appended to metrics.jsonl and printed."""
    s.comm.sync_buffers_(s.model)  # BatchNorm statistics: one average per evaluation
    test_loss, test_acc = evaluate(s.model, s.test_loader, s.amp, s.comm)
    _, train_acc = evaluate(s.model, s.train_eval, s.amp, s.comm)
    mean_loss = torch.stack([loss_sum, torch.tensor(float(loss_count), dtype=torch.float64, device=s.device)])
    if s.step_kind == "backprop":  # forward-only steps return the global batch's loss already
        s.comm.all_reduce_mean_(mean_loss)
    forward_only = s.step_kind != "backprop"
    fwd = s.optimizer.forward_passes if forward_only else step
    row = dict(step=step, epoch=round(step / s.steps_per_epoch, 3),
               train_loss=mean_loss[0].item() / max(1.0, mean_loss[1].item()), test_loss=test_loss,
               test_accuracy=test_acc, train_accuracy=train_acc, lr=float(s.optimizer.param_groups[0]["lr"]),
               train_seconds=round(train_seconds, 2),
               images_per_second=step * s.cfg.batch_size / max(train_seconds, 1e-9), forward_passes=fwd)
    if s.val_loader is not None:
        row["val_loss"], row["val_accuracy"] = evaluate(s.model, s.val_loader, s.amp, s.comm)
    if s.writes:
        with open(s.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if not s.quiet:  # tqdm.write clears and redraws a live bar; without one it is a plain print
        from tqdm import tqdm
        tqdm.write(f"step {step:>7}  epoch {row['epoch']:>6.2f}  loss {row['train_loss']:.4f}  "
                   f"test loss {test_loss:.4f}  test acc {test_acc:.4f}  train acc {train_acc:.4f}  "
                   + (f"val acc {row['val_accuracy']:.4f}  " if "val_accuracy" in row else "")
                   + f"{row['images_per_second']:.0f} img/s"
                   + (f"  {fwd / max(train_seconds, 1e-9):.0f} fwd/s" if forward_only else "")
                   + f"  {train_seconds:.0f} s", file=sys.stderr)
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


class _StopAtBoundary(Exception):
    pass


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Train per ``config`` into ``config.out``; with ``resume`` continue from the run's last checkpoint.

    Under torchrun every rank calls this; rank 0 alone writes files.  A torchrun restart
    (``--max-restarts``) resumes from the last complete checkpoint by itself.
    """
    cfg = config.resolved()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    comm = from_environment(kind)
    try:
        refusal = graph_refusal(kind, comm)
        if cfg.cuda_graph == "on" and refusal:
            raise ValueError(f"--cuda-graph on: {refusal}; use --cuda-graph auto (capture where possible) or off")
        return _train(cfg, pathlib.Path(cfg.out), resume, comm, kind, refusal)
    finally:
        shutdown(comm)


def _train(cfg: TrainConfig, out: pathlib.Path, resume: bool, comm: Communicator, kind: str,
           refusal: str | None) -> dict:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and checkpoints(out):
        resume = True  # torchrun restarted the job after a failure: continue from the last checkpoint
    # Failure drill for tests and operators: SUBGRAD_FAIL_AT="RANK:STEP" makes that rank exit abruptly
    # before STEP on the first attempt (not after a torchrun restart), as a crashed GPU would.
    fail_rank, _, fail_step = os.environ.get("SUBGRAD_FAIL_AT", "").partition(":")
    fail_at = int(fail_step) if fail_step and int(fail_rank) == comm.rank and \
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 else None

    s = setup(cfg, out, comm, kind)
    start, train_seconds, metrics = load_last_checkpoint(s) if resume else (0, 0.0, [])
    from .optim import ZOOptimizer
    normal_directions = isinstance(s.optimizer, ZOOptimizer) and s.optimizer.settings.distribution == "gaussian"
    if s.device.type == "cpu" and normal_directions:
        # compile the CPU twin of normal directions before the clock starts, not inside the first step
        if not s.quiet:
            print("preparing the compiled CPU twin of normal directions (torch.compile: ~15 s the first time "
                  "on a machine, cached after)", file=sys.stderr, flush=True)
        prepare_cpu_twin()
    train_step = TrainStep(s, start)
    run_step = train_step
    if cfg.cuda_graph != "off" and refusal is None:
        run_step = CudaGraphStep(train_step)
    elif cfg.cuda_graph == "auto" and s.device.type == "cuda" and not s.quiet:
        print(f"--cuda-graph auto: steps run uncaptured ({refusal})", file=sys.stderr)
    if s.writes:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(s.record, indent=1))
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))

    from tqdm import tqdm
    # A live bar only on a terminal: redirected to a file, its redraws would be almost all of the log, so
    # there the per-evaluation lines are the progress report.
    bar = tqdm(total=s.total, initial=start, disable=s.quiet or not sys.stderr.isatty(), unit="step",
               dynamic_ncols=True, file=sys.stderr, desc=f"{cfg.model}/{cfg.optimizer}"
               + (f" x{comm.world_size}" if comm.active else ""))
    if not s.quiet:
        tqdm.write(f"{cfg.model}/{cfg.optimizer}: steps {start}..{s.total}, batch {cfg.batch_size}, "
                   f"{s.steps_per_epoch} steps per epoch, evaluating every {s.eval_every} steps", file=sys.stderr)
    last_eval = metrics[-1] if metrics else None
    loss_count = 0  # steps since the last evaluation (their loss is summed on the device: train_step.loss_sum)
    step_bytes = 0  # payload bytes of the training steps' collectives (evaluation not included)
    step, interrupted, stop = start, False, _StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}  # a scheduler's
    # SIGTERM checkpoints like Ctrl-C
    try:
        tick = time.perf_counter()
        while step < s.total:
            if step == fail_at:
                print(f"rank {comm.rank}: SUBGRAD_FAIL_AT drill, exiting at step {step}", file=sys.stderr)
                os._exit(17)
            train_step.prepare(step)
            sent_before = comm.bytes_sent
            run_step()
            step_bytes += comm.bytes_sent - sent_before
            loss_count += 1
            step += 1
            bar.update(1)
            if step % s.eval_every == 0 or step == s.total:
                if s.device.type == "cuda":
                    torch.cuda.synchronize()
                train_seconds += time.perf_counter() - tick
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
        interrupted = True
        train_seconds += time.perf_counter() - tick
        path = save_checkpoint(s, step, train_seconds)
        bar.close()
        if s.writes:
            print(f"interrupted at step {step}: checkpoint written to {path}; continue with "
                  f"`subgrad train --resume {out}`", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        bar.close()
        if s.writes:
            print(f"stopped at once during step {step + 1} (second signal): no checkpoint written; the last "
                  f"complete one in {out / 'checkpoints'} is intact", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
    if interrupted:
        raise KeyboardInterrupt
    return finish(s, step, start, train_seconds, metrics, last_eval, step_bytes)


def finish(s: Session, step: int, start: int, train_seconds: float, metrics: list[dict], last_eval: dict,
           step_bytes: int) -> dict:
    """Check the replicas agree, write model.pt, summary.json and curves.png; return the summary."""
    s.comm.sync_buffers_(s.model)
    hashes = s.comm.all_gather_strings(weights_hash(s.model))
    if len(set(hashes)) != 1:
        raise RuntimeError(f"replicas diverged: weight hashes differ across ranks ({hashes}); this is a bug")
    cfg, device = s.cfg, s.device
    summary = dict(model=cfg.model, optimizer=cfg.optimizer, test_accuracy=last_eval["test_accuracy"],
                   train_accuracy=last_eval["train_accuracy"], test_loss=last_eval["test_loss"],
                   train_seconds=round(train_seconds, 2), steps=step, epochs=round(step / s.steps_per_epoch, 3),
                   images_per_second=last_eval["images_per_second"], forward_passes=last_eval["forward_passes"],
                   device=str(device),
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                   or platform.machine(), versions=versions(), data=s.data_source, world_size=s.comm.world_size,
                   bytes_communicated_per_step=step_bytes / max(1, step - start), weights_sha256=hashes[0])
    if "val_accuracy" in last_eval:
        summary.update(val_accuracy=last_eval["val_accuracy"], val_loss=last_eval["val_loss"],
                       validation_images=cfg.validation)
    if s.writes:
        atomic_save(checkpoint(s, step, train_seconds), s.out / "model.pt")
        atomic_write_text(s.out / "summary.json", json.dumps(summary, indent=1))
        plot_curves(metrics, s.out / "curves.png", f"{cfg.model} / {cfg.optimizer}")
    if not s.quiet:
        print(f"test accuracy {summary['test_accuracy']:.4f}, train accuracy {summary['train_accuracy']:.4f}, "
              f"{summary['train_seconds']:.0f} s; run folder {s.out}", file=sys.stderr)
    return summary
