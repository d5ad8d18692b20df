"""Where to run: the one rule behind every ``--device auto`` (commands, self-check, benchmarks), and the name
a result records for the machine it was measured on."""

from __future__ import annotations

import pathlib
import platform

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def pick_device(choice: str = "auto"):
    """``auto``: the GPU when torch sees one, else the CPU; ``cpu`` / ``cuda`` as given."""
    import torch

    if choice not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {choice!r}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def machine_name(device) -> str:
    """The GPU's name, or the CPU's model and torch's thread count (these VMs differ by 2x between days)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads"
