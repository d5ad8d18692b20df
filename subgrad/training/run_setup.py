"""A training run's setup: device, data, model and optimizer (:func:`setup` -> :class:`TrainingRun`), evaluation,
the validation split, and checkpoints (what they hold, writing them, resuming from the last one)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Dataset, DeviceLoader, load_cifar10
from ..model_names import model_source
from ..models import build_model
from ..run_folder import CHECKPOINT_FORMAT, atomic_save, checkpoints, latest_checkpoint, load_checkpoint
from .config import UNSET, TrainConfig
from .distributed import Communicator
from .optimizers import REGISTRY


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, replicas: Communicator | None = None):
    """The optimizer ``cfg`` names (:mod:`.optimizers`), for ``model``; with ``replicas`` it exchanges with
    the other ranks what its family needs (gradients, a step's losses, or per-example loss differences)."""
    return REGISTRY[cfg.optimizer].build(cfg, model, replicas)


# -- run folder -------------------------------------------------------------------------------------
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
class TrainingRun:
    """What one training process holds once set up (:func:`setup`); the loop reads it top to bottom."""

    cfg: TrainConfig
    out: pathlib.Path
    comm: Communicator
    device: torch.device
    amp: bool  # bfloat16 autocast (CUDA only)
    step_kind: str  # optimizers.STEP_KINDS: "backprop", "closure" (the step runs a loss closure) or "blocks"
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


def setup(
    cfg: TrainConfig, out: pathlib.Path, comm: Communicator, kind: str, data: Dataset | None = None
) -> TrainingRun:
    """Device, data (``cfg.data``, unless a loaded ``data`` is given), model and optimizer of a run, seeded
    from ``cfg.seed``."""
    device = torch.device(kind, comm.local_rank) if kind == "cuda" and comm.active else torch.device(kind)
    if device.type == "cuda":
        # Exact resume needs the same bits every run; cuDNN may otherwise pick autotuned or atomic-add
        # convolution backward algorithms that differ from run to run.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if cfg.batch_size % comm.world_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
            f"({comm.world_size}): every rank trains on an equal shard of each batch"
        )
    data = data if data is not None else load_cifar10(cfg.data)
    mean, std = data.channel_stats()  # of the whole training set, held-out images included
    train_images, train_labels, val_images, val_labels = validation_split(
        data.train_images, data.train_labels, cfg.validation
    )
    steps_per_epoch = len(train_labels) // cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    step_kind = REGISTRY[cfg.optimizer].step_kind
    eval_every = cfg.eval_every or (max(1, total // 10) if step_kind != "backprop" else steps_per_epoch)
    train_loader = DeviceLoader(
        train_images,
        train_labels,
        mean,
        std,
        cfg.batch_size,
        device,
        augment=cfg.augment,
        shuffle=True,
        drop_last=True,
        order_seed=cfg.seed,
        augment_seed=cfg.seed + 1,
    )
    # evaluation: each rank its strided share; every 5th training image (10,000 of all classes; the archive
    # is sorted by class) for train accuracy
    r, w = comm.rank, comm.world_size
    test_loader = DeviceLoader(data.test_images[r::w], data.test_labels[r::w], mean, std, 1000, device)
    train_eval = DeviceLoader(train_images[::5][r::w], train_labels[::5][r::w], mean, std, 1000, device)
    val_loader = DeviceLoader(val_images[r::w], val_labels[r::w], mean, std, 1000, device) if cfg.validation else None

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, code_named=cfg.model).to(device)  # resume_config checked a resumed run's
    optimizer = make_optimizer(cfg, model, comm if comm.active else None)
    record = dict(
        dataclasses.asdict(cfg),
        steps_total=total,
        steps_per_epoch=steps_per_epoch,
        mean=mean,
        std=std,
        classes=list(data.classes),
        model_config={},
        device_resolved=str(device),
        world_size=w,
    )
    return TrainingRun(
        cfg=cfg,
        out=out,
        comm=comm,
        device=device,
        amp=cfg.amp and device.type == "cuda",
        step_kind=step_kind,
        writes=comm.is_main,
        quiet=cfg.quiet or not comm.is_main,
        steps_per_epoch=steps_per_epoch,
        total=total,
        eval_every=eval_every,
        checkpoint_every=cfg.checkpoint_every or eval_every,
        train_loader=train_loader,
        test_loader=test_loader,
        train_eval=train_eval,
        val_loader=val_loader,
        model=model,
        optimizer=optimizer,
        base_lrs=[g["lr"] for g in optimizer.param_groups],
        record=record,
        data_source=str(data.source),
    )


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


def resume_config(
    run: str | pathlib.Path,
    steps: int | None = None,
    epochs: float | None = None,
    quiet: bool = False,
    model: str | None = None,
) -> TrainConfig:
    """The config to continue the run in folder ``run`` (``subgrad train --resume RUN``); a new ``steps``
    or ``epochs`` replaces the saved training length.  ``model``: the ``--model`` the user gave, which must
    be the run's, and which a run of the user's own constructor needs (its code is imported only when the
    user names it, never because the folder does)."""
    saved = pathlib.Path(run) / "config.json"
    if not saved.is_file():
        raise ValueError(f"--resume {run}: no config.json there; is it a run folder?")
    config = TrainConfig.from_record(json.loads(saved.read_text()))
    if model is not None and model != config.model:
        raise ValueError(f"--resume {run}: the run trains {config.model!r}, not --model {model!r}")
    if model_source(config.model) == "code" and model != config.model:
        raise ValueError(
            f"--resume {run}: the run trains your code {config.model!r}, which subgrad imports only when you name "
            f"it: add --model {config.model}"
        )
    config.out = str(run)
    steps, epochs = (None if v is UNSET else v for v in (steps, epochs))  # UNSET: the flag was not given
    if steps is not None or epochs is not None:
        config.steps, config.epochs = steps, epochs
    config.quiet = quiet or config.quiet
    return config


def load_last_checkpoint(s: TrainingRun) -> tuple[int, float, list[dict]]:
    """Restore model and optimizer from the run's last checkpoint: (step, train_seconds, metrics so far)."""
    ckpt_path = latest_checkpoint(s.out)
    ckpt = load_checkpoint(ckpt_path)
    cfg, w = s.cfg, s.comm.world_size
    if ckpt["config"]["model"] != cfg.model or ckpt["config"]["optimizer"] != cfg.optimizer:
        raise ValueError(
            f"checkpoint {ckpt_path} is a {ckpt['config']['model']}/{ckpt['config']['optimizer']} "
            f"run, not {cfg.model}/{cfg.optimizer}"
        )
    saved_world = ckpt.get("world_size", 1)
    if saved_world != w:
        raise ValueError(
            f"checkpoint {ckpt_path} was written by a {saved_world}-process run and this one has {w}; "
            f"resume with the same number of processes (--nproc {saved_world}), because the "
            "shard sums would round differently and the run would not be exact"
        )
    s.model.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    metrics = []
    if (s.out / "metrics.jsonl").exists():
        metrics = [
            m for m in map(json.loads, (s.out / "metrics.jsonl").read_text().splitlines()) if m["step"] <= ckpt["step"]
        ]
    return ckpt["step"], ckpt["train_seconds"], metrics


def checkpoint(s: TrainingRun, step: int, train_seconds: float) -> dict:
    """The checkpoint format (``subgrad.run_folder.CHECKPOINT_FORMAT``): periodic checkpoints and model.pt alike."""
    return dict(
        format=CHECKPOINT_FORMAT,
        model=s.model.state_dict(),
        optimizer=s.optimizer.state_dict(),
        step=step,
        train_seconds=train_seconds,
        config=dataclasses.asdict(s.cfg),
        world_size=s.comm.world_size,
    )


def save_checkpoint(s: TrainingRun, step: int, train_seconds: float) -> pathlib.Path:
    """checkpoints/step-NNNNNNN.pt (rank 0 only: replicas are identical); keeps the last three."""
    path = s.out / "checkpoints" / f"step-{step:07d}.pt"
    if s.writes:
        atomic_save(checkpoint(s, step, train_seconds), path)
        for old in checkpoints(s.out)[:-3]:
            old.unlink(missing_ok=True)
    return path
