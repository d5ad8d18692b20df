"""kernels/seeds.py: the step seed computed on the device (``next_step_seed_``) is the host's ``step_seed``,
Triton and twin, at the edges of the seed range, and the counter advances.  Fast tier."""

import pytest
import torch

from subgrad.kernels import next_step_seed_, step_seed


@pytest.mark.parametrize("steps", [0, 1, 2**40])
@pytest.mark.parametrize("base", [0, 12345, 2**62 - 1])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_next_step_seed_is_step_seed_and_advances(base, steps, backend, device):
    counter = torch.tensor([steps], dtype=torch.int64, device=device)
    out = torch.zeros(1, dtype=torch.int64, device=device)
    for t in range(steps, steps + 3):
        next_step_seed_(counter, out, base, backend=backend)
        assert int(out) == step_seed(base, t), f"step {t}: {int(out)} vs {step_seed(base, t)}"
        assert int(counter) == t + 1
