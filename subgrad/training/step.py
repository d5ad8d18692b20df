"""One training step whose every input lives on the device (:class:`TrainStep`, what ``--cuda-graph``
captures), the learning-rate schedules it reads, and when a step cannot be captured."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .distributed import Communicator
from .run_setup import TrainingRun


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    t = step / max(1, total)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":  # linear warm-up over 20%, then linear decay to 0
        return t / 0.2 if t < 0.2 else max(0.0, (1 - t) / 0.8)
    return 1.0


class TrainStep:
    """One training step whose every input lives on the device, so that a CUDA graph can capture it.

    Between steps the host writes only what changes on its own schedule: the epoch's image order (once
    per epoch) and each param group's learning rate (one fill each), in :meth:`prepare`.  The step itself
    gathers and augments its batch from the device step counter (:meth:`DeviceLoader.gather`), runs the
    forward passes (and the backward pass, first-order) and the optimizer step, and adds its loss to
    ``loss_sum``; it reads nothing back, so eager and graphed steps are the same launches.
    """

    def __init__(self, s: TrainingRun, start: int):
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
