"""What every benchmark script shares: the device flag and its one rule (``subgrad.devices``), the machine
name and versions a result records, and writing it (:func:`write_result`)."""

from __future__ import annotations

import datetime
import json
import pathlib
import shlex
import sys

from subgrad.devices import DEVICE_CHOICES, machine_name, pick_device
from subgrad.run_folder import atomic_write_text, versions

__all__ = ["add_device_argument", "pick_device", "machine_name", "versions", "write_result"]


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto: cuda when available")


def write_result(path: str | pathlib.Path, payload: dict, device) -> pathlib.Path:
    """Write a benchmark's results JSON atomically, with what a figure needs to be read: the machine, the
    date, the command that made it and the versions (``payload``'s own keys win)."""
    record = dict(
        machine=machine_name(device),
        date=datetime.date.today().isoformat(),
        command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        versions=versions(),
        **payload,
    )
    return atomic_write_text(path, json.dumps(record, indent=1) + "\n")
