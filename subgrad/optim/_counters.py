"""A forward-only optimizer's step counters, kept on the device so that a step never reads them.

Each step advances ``steps`` and derives its direction seed from it on the device
(:func:`subgrad.kernels.next_step_seed_`), and counts itself in ``skipped`` when its estimate is not
finite, without the host looking: the kernels read the seed and the skip decision through pointers, so
the step's launches are the same at every step and replay in a CUDA graph.  The host reads the counters
only when asked (``state_dict``, metrics), and warns about skipped steps then.
"""

from __future__ import annotations

import warnings

import torch

from .. import kernels as K


class StepCounters:
    """``steps`` taken, this step's direction ``seed`` and the ``skipped`` steps, as int64 ``[1]`` tensors
    on one device (made there at the first step, from the values a fresh or loaded optimizer starts with)."""

    def __init__(self, owner: str):
        self.owner = owner  # the optimizer's name, for the warning
        self.steps: torch.Tensor | None = None
        self.seed: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None
        self._start = (0, 0)  # (steps, skipped) before the tensors exist
        self._warned = False

    def on(self, device: torch.device) -> "StepCounters":
        """Make (or move) the tensors on ``device``."""
        if self.steps is None or self.steps.device != device:
            steps, skipped = self.values()
            self.steps = torch.tensor([steps], dtype=torch.int64, device=device)
            self.skipped = torch.tensor([skipped], dtype=torch.int64, device=device)
            self.seed = torch.zeros(1, dtype=torch.int64, device=device)
        return self

    def advance(self, base_seed: int, backend: str | None) -> torch.Tensor:
        """Start a step: ``seed = step_seed(base_seed, steps); steps += 1`` on the device; returns ``seed``."""
        K.next_step_seed_(self.steps, self.seed, base_seed, backend)
        return self.seed

    def count_skip(self, finite: torch.Tensor) -> None:
        """``skipped += not finite`` (a device bool), on the device."""
        self.skipped.add_(~finite)

    def values(self) -> tuple[int, int]:
        """(steps, skipped), read from the device (a synchronisation: for checkpoints and metrics)."""
        return self.steps_taken(), self._read_skipped()

    def steps_taken(self) -> int:
        return self._start[0] if self.steps is None else int(self.steps.reshape(()))

    def _read_skipped(self) -> int:
        return self._start[1] if self.skipped is None else int(self.skipped.reshape(()))

    def load(self, steps: int, skipped: int) -> None:
        self._start = (int(steps), int(skipped))
        if self.steps is not None:
            self.steps.fill_(int(steps))
            self.skipped.fill_(int(skipped))

    def skipped_steps(self) -> int:
        """Steps skipped so far; the first time any are seen, one warning says so."""
        skipped = self._read_skipped()
        if skipped and not self._warned:
            warnings.warn(
                f"{self.owner}: {skipped} step(s) had a non-finite loss (difference); their updates were "
                "skipped on the device and the weights left as before (counted in optimizer.skipped_steps; "
                "warning once)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True
        return skipped
