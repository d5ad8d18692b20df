"""What a data-parallel optimizer needs of the other ranks, passed at construction (``replicas=``).

Every rank holds the same weights and its shard of each batch; the optimizers exchange only:

* SGD, AdamW: the flat gradient buffer, averaged in place (``all_reduce_mean_``) before the update;
* ZOSGD, ZOAdam, HiZOO: the step's 2q (+1) float64 losses, averaged (``all_reduce_mean_``);
* ActivityZO: per block, every rank's per-example loss differences (``all_gather_examples``) of the
  perturbed passes it ran for its contiguous share (``rank``, ``world_size``) of the batch.

:class:`subgrad.training.distributed.Communicator` is one (torch.distributed, byte-counted); ``None`` is one process.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Replicas(Protocol):
    rank: int
    world_size: int

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over ranks in place (the same float ops on every rank) and return it."""

    def all_gather_examples(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along the last dimension in rank order."""
