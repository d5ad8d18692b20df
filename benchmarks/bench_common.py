"""What every benchmark script shares: the device flag and its one rule (``subgrad.devices``), the machine
name and versions a result records, and writing it (:func:`write_result`)."""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import shlex
import sys

from subgrad.devices import DEVICE_CHOICES, machine_name, pick_device
from subgrad.run_folder import atomic_write_text, versions

__all__ = ["add_device_argument", "pick_device", "machine_name", "file_label", "versions", "write_result"]


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto: cuda when available")


def file_label(device) -> str:
    """Where a result ran, as its file name says it (``kernels-cuda-nvidia-h200.json``,
    ``kernels-cpu-x86-64.json``): the GPU's name, else the CPU architecture, lower case with dashes."""
    import torch

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def write_result(path: str | pathlib.Path, payload: dict, device, argv: list[str] | None = None) -> pathlib.Path:
    """Write a benchmark's results JSON atomically, with what a figure needs to be read: the machine, the
    date, the command that made it (``argv``: the script's arguments when not ``sys.argv``'s) and the
    versions; ``payload``'s own keys win."""
    script = pathlib.Path(sys.argv[0]).as_posix()
    arguments = sys.argv[1:] if argv is None else argv
    record = {
        "machine": machine_name(device),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in ["python", script, *arguments]),
        "versions": versions(),
        **payload,
    }
    return atomic_write_text(path, json.dumps(record, indent=1) + "\n")
