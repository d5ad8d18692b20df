"""Data-parallel training on torch.distributed (torchrun): NCCL on GPUs, gloo on CPU.

Every rank holds the whole uint8 dataset, draws the same global batch (same order and augmentation
seeds) and keeps its contiguous shard of it.  What crosses the wire per step:

* first-order: one all-reduce of the flat gradient buffer (``all_reduce_mean_``), then the fused update;
* zeroth-order: one all-reduce of the step's 2q (+1) float64 losses.
  Every rank regenerates every direction from the shared seed schedule and applies the same update,
  so replicas stay bit-identical without ever sending a weight.
* ``zo`` (activity perturbation): every rank runs the clean pass on the whole global batch and the
  perturbed tails for its shard; one all-gather per block of the per-example loss differences
  (``all_gather_examples``); every rank forms the same gradients and update.

:class:`Communicator` wraps the collectives and counts the payload bytes each one sends, which is how
tests and ``benchmarks/distributed.py`` show that zeroth-order traffic does not grow with the model.
Every optimizer takes it at construction (``replicas=comm``: :mod:`subgrad.optim.replicas`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..run_folder import checkpoints


@dataclass
class Communicator:
    """Rank / world size and byte-counted collectives (a no-op wrapper when ``world_size == 1``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    bytes_sent: int = 0  # payload bytes this rank handed to collectives
    calls: int = 0
    by_kind: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _count(self, kind: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        self.bytes_sent += n
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks (sum, then divide: the same float ops on every rank)."""
        if self.active:
            self._count("all_reduce", tensor)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            self._count("all_reduce", tensor)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _mean_of_many_(self, tensors: list[torch.Tensor], kind: str) -> None:
        """Average several tensors over ranks in place: one all-reduce of their concatenation."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])  # (mixed dtypes promote; copy_ casts back)
        self._count(kind, flat)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def sync_buffers_(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks.

        Each rank's BatchNorm sees only its shard, so running statistics drift apart (as under DDP
        without SyncBatchNorm); training calls this before every evaluation and at the end, so replicas,
        checkpoints and the final hash agree.  Buffer-sized, once per evaluation, never per step.
        """
        self._mean_of_many_([b for b in model.buffers() if b.is_floating_point()], "buffers")

    def all_gather_examples(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on every rank) concatenated along the last dimension in rank
        order: each rank's per-example values for its shard -> the global batch's."""
        if not self.active:
            return tensor
        tensor = tensor.contiguous()
        self._count("all_gather", tensor)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=-1)

    def all_gather_strings(self, value: str) -> list[str]:
        if not self.active:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (the batch must divide evenly)."""
        if not self.active:
            return x
        n = x.shape[0] // self.world_size
        return x[self.rank * n : (self.rank + 1) * n]


def from_environment(device_kind: str) -> Communicator:
    """Join the process group torchrun describes in the environment; a single process otherwise.

    ``device_kind`` "cuda" picks NCCL and this rank's GPU (LOCAL_RANK); "cpu" picks gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Communicator()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        import datetime

        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        # One key prefix per torchrun attempt: after a restart the rendezvous store still holds the dead
        # attempt's addresses under the default prefix, and a rank that read one of those could not
        # connect (seen as a flaky "Gloo connectFullMesh failed ... Connection refused").
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=rank == 0 and not agent_store,
            timeout=datetime.timedelta(minutes=5),
        )
        dist.init_process_group(
            backend=backend, store=dist.PrefixStore(f"subgrad/attempt-{attempt}", store), rank=rank, world_size=world
        )
    return Communicator(rank=rank, world_size=world, local_rank=local)


def shutdown(comm: Communicator) -> None:
    """Leave the process group explicitly: every rank first reaches the barrier, so none tears down its
    gloo connections while a peer still uses them (exiting without this aborted ranks at exit, rarely)."""
    if comm.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restarted_after_failure(out: pathlib.Path) -> bool:
    """torchrun restarted this job after a failure (``--max-restarts``) and the run has a checkpoint to
    continue from."""
    return _restart_count() > 0 and bool(checkpoints(out))


def with_failure_drill(run: Callable[[], None], comm: Communicator) -> Callable[[int], None]:
    """``run`` as a function of the step number.  The failure drill for tests and operators:
    ``SUBGRAD_FAIL_AT="RANK:STEP"`` makes that rank exit abruptly (status 17) before STEP, on the first
    attempt only (not after a torchrun restart), as a crashed GPU would."""
    rank, _, step = os.environ.get("SUBGRAD_FAIL_AT", "").partition(":")
    fail_at = int(step) if step and int(rank) == comm.rank and _restart_count() == 0 else None

    def run_step(index: int) -> None:
        if index == fail_at:
            print(f"rank {comm.rank}: SUBGRAD_FAIL_AT drill, exiting at step {index}", file=sys.stderr)
            os._exit(17)
        run()

    return run_step


def exit_worker(code: int) -> None:
    """End a torchrun worker without interpreter finalisation.

    With gloo, a rank that exits normally after ``destroy_process_group`` still aborts now and then
    ("terminate called without an active exception", SIGABRT) while the interpreter tears down gloo's
    worker threads (measured: 1 run in 5 for resnet20 on CPU; pytorch/pytorch PR 179291 describes the
    finalisation race).  Every file is written and closed by then, so flush and leave with ``os._exit``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes, in state_dict order (replica check)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
