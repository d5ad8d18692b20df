"""The trainer's CUDA-graph runtime: a step captured once and replayed.

What makes a step capturable (no host synchronisation, the same launches on the same buffers at every
step) is checked without a GPU by the instruments in :mod:`subgrad.testing`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CudaGraphStep:
    """``step()`` as a CUDA graph: the first ``warmup`` calls run it eagerly on a side stream (so lazy state,
    Triton compilations and cuBLAS/cuDNN workspaces exist before capture), the next call captures it and
    replays the capture, and every later call only replays.  The captured step must be capturable: see
    the module docstring of :mod:`subgrad.testing`, and :class:`subgrad.training.step.TrainStep` for the trainer's."""

    def __init__(self, step: Callable[[], object], warmup: int = 3):
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._calls = 0

    def __call__(self) -> None:
        if self.graph is None and self._calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            self._calls += 1
            return
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step's launches; nothing runs
                self.step()
            self.graph = graph
        self.graph.replay()
