"""The ``subgrad`` command line.  Subcommands arrive with their issues; each is a thin wrapper."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu (Triton interpreter)")
    if not (args.device in ("auto", "cuda") and torch.cuda.is_available()):
        # No GPU: run the Triton kernels in Triton's interpreter (must be set before they are imported).
        os.environ["TRITON_INTERPRET"] = "1"
    from .selfcheck import run_selfcheck

    return 0 if run_selfcheck(args.device, args.n) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subgrad",
        description="Zeroth-order and fused first-order optimizers as Triton kernels, CIFAR-10 training, "
                    "ONNX export.")
    parser.add_argument("--version", action="version", version=f"subgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("selfcheck", help="run every Triton kernel against its torch twin and compare",
                           description="Run every Triton kernel and its torch twin on the same data; "
                                       "exit 1 unless all results are bit-identical.")
    check.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where to run (auto: cuda when available)")
    check.add_argument("--n", type=int, default=70001, help="elements per test buffer (default 70001)")
    check.set_defaults(func=_cmd_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, RuntimeError, ImportError, OSError) as exc:  # one line, no traceback soup
        print(f"subgrad {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
