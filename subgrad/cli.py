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


def _cmd_train(args: argparse.Namespace) -> int:
    import json
    import pathlib

    from .train import TrainConfig, train

    if args.resume:
        saved = pathlib.Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume {args.resume}: no config.json there; is it a run folder?")
        fields = {f for f in TrainConfig.__dataclass_fields__}
        config = TrainConfig(**{k: v for k, v in json.loads(saved.read_text()).items() if k in fields})
        config.out = args.resume
        if args.steps is not None or args.epochs is not None:
            config.steps, config.epochs = args.steps, args.epochs
        config.quiet = args.quiet or config.quiet
    else:
        values = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if k != "extra" and hasattr(args, k)}
        config = TrainConfig(**values)
    try:
        summary = train(config, resume=bool(args.resume))
    except KeyboardInterrupt:
        return 130
    if args.quiet:
        print(json.dumps({k: summary[k] for k in ("test_accuracy", "train_accuracy", "train_seconds")}))
    return 0


def _blocks(value: str):
    return int(value) if value.isdigit() else value


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

    from .models import MODELS
    from .train import OPTIMIZERS, SCHEDULES

    tr = sub.add_parser("train", help="train a CIFAR-10 model into a run folder",
                        description="Train lenet or resnet20 on CIFAR-10 with any subgrad optimizer. Flags left "
                                    "out take the defaults for the model/optimizer pair (subgrad/train.py DEFAULTS).")
    tr.add_argument("--model", default="lenet", choices=sorted(MODELS))
    tr.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    tr.add_argument("--data", default="./data", help="CIFAR-10: .tar.gz, torchvision folder, ImageFolder tree, "
                                                     "or a path to download to (default ./data)")
    tr.add_argument("--out", default="runs/run", help="run folder (default runs/run)")
    tr.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--seed", type=int, default=0)
    length = tr.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="training length in epochs")
    length.add_argument("--steps", type=int, help="training length in optimizer steps")
    tr.add_argument("--batch-size", dest="batch_size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--schedule", choices=SCHEDULES)
    tr.add_argument("--momentum", type=float)
    tr.add_argument("--weight-decay", dest="weight_decay", type=float)
    zo = tr.add_argument_group("zeroth-order (zo-sgd, zo-adam, hizoo)")
    zo.add_argument("--eps", type=float, help="perturbation size")
    zo.add_argument("--q", type=int, help="directions per step")
    zo.add_argument("--estimator", default="central", choices=["central", "forward"])
    zo.add_argument("--distribution", default="gaussian", choices=["gaussian", "rademacher"])
    zo.add_argument("--blocks", type=_blocks, help="none, tensor, module or a block size")
    zo.add_argument("--clip", type=float, help="clamp finite-difference scalars to [-clip, clip] (0: off)")
    zo.add_argument("--scale-by-block-size", dest="scale_by_block_size", action=argparse.BooleanOptionalAction,
                    default=None, help="scale each block's step by (d + 2) / (d_block + 2)")
    tr.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                    help="random crop + flip (default: on for first-order, off for zeroth-order)")
    tr.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    tr.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evaluations")
    tr.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="steps between checkpoints")
    tr.add_argument("--quiet", action="store_true", help="no progress bar; print the summary as JSON")
    tr.set_defaults(func=_cmd_train)
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
