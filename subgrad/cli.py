"""The ``subgrad`` command line: selfcheck, train, run here; export, validate, bench, quantize, predict,
package and serve in :mod:`subgrad.export.commands`.

Each subcommand is a thin wrapper over a library function; errors print one line and exit 2.
"""

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


def _launch_torchrun(args: argparse.Namespace) -> int:
    """`subgrad train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m subgrad train ...`."""
    import subprocess

    argv, skip = [], False
    for arg in args.argv:
        if skip:
            skip = False
            continue
        if arg in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if arg.startswith(("--nproc=", "--max-restarts=")):
            continue
        argv.append(arg)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        f"--max-restarts={args.max_restarts}",
        "-m",
        "subgrad",
        *argv,
    ]
    rc = subprocess.call(cmd)
    if rc not in (0, 130):
        out = args.resume or args.out
        print(
            f"subgrad train: a rank failed (torchrun exit status {rc}); the last complete checkpoint in "
            f"{out}/checkpoints is intact: continue with `subgrad train --resume {out} --nproc {args.nproc}`",
            file=sys.stderr,
        )
    return rc


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args)

    from .training.config import config_from_args
    from .training.loop import train
    from .training.run_setup import resume_config

    if args.resume:
        config = resume_config(args.resume, steps=args.steps, epochs=args.epochs, quiet=args.quiet, model=args.model)
    else:
        config = config_from_args(args)
    try:
        summary = train(config, resume=bool(args.resume))
    except KeyboardInterrupt:
        return 130
    if args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    k: summary[k]
                    for k in ("test_accuracy", "train_accuracy", "val_accuracy", "train_seconds")
                    if k in summary
                }
            )
        )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from subgrad.pipeline import run_pipeline
    from subgrad.training.config import config_from_args

    try:
        result = run_pipeline(config_from_args(args), bench_runs=args.bench_runs)
    except KeyboardInterrupt:
        return 130
    print(f"report: {result['report']}")
    return 0 if result["validation"]["passed"] else 1


def build_parser(model: str = "lenet", optimizer: str = "sgd") -> argparse.ArgumentParser:
    """The whole command line; ``model``/``optimizer`` pick the pair whose defaults the help shows."""
    parser = argparse.ArgumentParser(
        prog="subgrad",
        description="Zeroth-order and fused first-order optimizers as Triton kernels, CIFAR-10 training, ONNX export.",
    )
    parser.add_argument("--version", action="version", version=f"subgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser(
        "selfcheck",
        help="run every Triton kernel against its torch twin and compare",
        description="Run every Triton kernel and its torch twin on the same data; "
        "exit 1 unless all results are bit-identical.",
    )
    check.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto: cuda when available)"
    )
    check.add_argument("--n", type=int, default=70001, help="elements per test buffer (default 70001)")
    check.set_defaults(func=_cmd_selfcheck)

    from .training.config import add_config_arguments

    tr = sub.add_parser(
        "train",
        help="train a CIFAR-10 model into a run folder",
        description="Train a model (built-in, torchvision:NAME or your package.module:callable) on CIFAR-10 "
        "with any subgrad optimizer. Flags left out take the defaults for the model/optimizer pair (the registry in "
        "subgrad/training/optimizers.py); --help after --model/--optimizer shows that pair's values.",
    )
    add_config_arguments(tr, model, optimizer)
    tr.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    tr.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes: relaunches itself under torchrun (gloo on CPU, NCCL on GPUs)",
    )
    tr.add_argument(
        "--max-restarts",
        dest="max_restarts",
        type=int,
        default=0,
        help="with --nproc: torchrun restarts after a rank failure, resuming from the last checkpoint",
    )
    tr.set_defaults(func=_cmd_train)
    from .export.commands import add_commands

    add_commands(sub)  # export, validate, bench, quantize, predict, package, serve
    ru = sub.add_parser(
        "run",
        help="the main job: train, export, validate, benchmark, report.md",
        description="Train (every `subgrad train` setting applies), export to ONNX, validate on the "
        "test set, benchmark, and write report.md in the run folder.",
    )
    add_config_arguments(ru, model, optimizer, defaults=dict(out="runs/main"))
    ru.add_argument("--bench-runs", dest="bench_runs", type=int, help="timed runs per batch size")
    ru.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pair = argparse.ArgumentParser(add_help=False)  # the pair whose defaults --help shows
    pair.add_argument("--model", default="lenet")
    pair.add_argument("--optimizer", default="sgd")
    known, _ = pair.parse_known_args(argv)
    parser = build_parser(known.model, known.optimizer)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = args.func(args)
    except (ValueError, RuntimeError, ImportError, OSError) as exc:  # one line, no traceback soup
        print(f"subgrad {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker: see exit_worker
        from .training.distributed import exit_worker

        exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
