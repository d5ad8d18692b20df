"""What every benchmark script shares: the device flag and its one rule (``subgrad.devices``), and the
machine name a result records."""

from __future__ import annotations

from subgrad.devices import DEVICE_CHOICES, machine_name, pick_device

__all__ = ["add_device_argument", "pick_device", "machine_name"]


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto: cuda when available")
