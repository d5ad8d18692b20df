"""``subgrad adapt`` and ``subgrad corrupt``: thin wrappers over :mod:`subgrad.export.adapt_run` and
:mod:`subgrad.export.corrupt`.  ``adapt`` imports no torch (it runs where only onnxruntime does)."""

from __future__ import annotations

import argparse
import sys


def _providers(value: str) -> list[str]:
    names = [p.strip() for p in value.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give onnxruntime provider names, e.g. CPUExecutionProvider")
    return names


def _cmd_adapt(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from subgrad.export.adapt import UNLABELLED_OBJECTIVE, AdaptSettings
    from subgrad.export.adapt_run import adapt_file, state_folder

    given = {f.name: getattr(args, f.name) for f in fields(AdaptSettings) if getattr(args, f.name, None) is not None}
    given.setdefault("objective", UNLABELLED_OBJECTIVE if args.unlabelled else "cross_entropy")
    run = {
        k: getattr(args, k) for k in ("steps", "batch_size", "threads", "eval_fraction") if getattr(args, k) is not None
    }
    print(f"adapting {args.model} on {args.data}; state in {state_folder(args.out)}", file=sys.stderr)
    try:
        report = adapt_file(
            args.model,
            args.data,
            args.out,
            unlabelled=args.unlabelled,
            settings=AdaptSettings(**given),
            providers=args.providers,
            resume=args.resume,
            progress=not args.quiet,
            **run,
        )
    except KeyboardInterrupt as exc:
        print(f"subgrad adapt: {exc}", file=sys.stderr)
        return 130
    before, after = report["before"], report["after"]
    if "accuracy" in before:
        held = f"held-out accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}"
    else:
        held = f"held-out {report['settings']['objective']} {before['objective']:.4f} -> {after['objective']:.4f}"
    print(
        f"{held}, predictions kept {report['agreement']:.3f}; {report['steps']} steps ({report['skipped']} skipped), "
        f"{report['seconds']:.1f} s; wrote {args.out}"
    )
    return 0


def _cmd_corrupt(args: argparse.Namespace) -> int:
    from subgrad.data import load_cifar10
    from subgrad.export.corrupt import write_scenario

    data = load_cifar10(args.data, download=False)
    written = write_scenario(
        data.test_images,
        data.test_labels,
        data.classes,
        args.out,
        args.corruptions,
        args.severity,
        args.seed,
        args.limit,
    )
    count = next(iter(written.values()))
    print(f"wrote {', '.join(written)} under {args.out} (each: adapt/ and eval/ halves of {count} test images)")
    return 0


def add_adapt_commands(sub) -> None:
    from subgrad.export.adapt import DEFAULT_LR, AdaptSettings
    from subgrad.export.adapt_run import DEFAULT_BATCH_SIZE, DEFAULT_STEPS
    from subgrad.export.corrupt import CORRUPTIONS, DEFAULT_SEVERITY

    d = AdaptSettings()
    ad = sub.add_parser(
        "adapt",
        help="adapt an exported model to new images with forward passes only (onnxruntime, no torch)",
        description="Zeroth-order steps through one onnxruntime session on a private copy of the graph; "
        "accuracy (or prediction entropy) on a held-out part before and after; the adapted model "
        "written atomically. State is kept beside --out for --resume.",
    )
    ad.add_argument("model", metavar="MODEL.onnx")
    ad.add_argument(
        "--data", required=True, metavar="DIR|ARCHIVE", help="<class>/ image folders (or adapt/ and eval/ above them)"
    )
    ad.add_argument("--out", required=True, metavar="ADAPTED.onnx")
    ad.add_argument("--unlabelled", action="store_true", help="ignore labels: a test-time objective (default foa)")
    ad.add_argument("--params", help=f"head, affine, last:K, all or a glob over weight names (default {d.params})")
    ad.add_argument(
        "--objective",
        choices=["cross_entropy", "entropy", "foa"],
        help="default: cross_entropy, or foa with --unlabelled",
    )
    ad.add_argument("--steps", type=int, help=f"default {DEFAULT_STEPS}")
    ad.add_argument("--batch-size", dest="batch_size", type=int, help=f"default {DEFAULT_BATCH_SIZE}")
    ad.add_argument("--q", type=int, help=f"directions per step (default {d.q})")
    ad.add_argument("--eps", type=float, help=f"perturbation size (default {d.eps})")
    ad.add_argument(
        "--lr",
        type=float,
        help="Adam's lr (default by objective: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_LR.items()) + ")",
    )
    ad.add_argument("--optimizer", choices=["adam", "sgd"], help=f"default {d.optimizer}")
    ad.add_argument("--distribution", choices=["rademacher", "gaussian"], help=f"default {d.distribution}")
    ad.add_argument("--clip", type=float, help="clamp each finite-difference scalar to [-clip, clip]")
    ad.add_argument("--align", type=float, help=f"weight of the statistics term of --objective foa (default {d.align})")
    ad.add_argument("--seed", type=int, help=f"default {d.seed}")
    ad.add_argument("--providers", type=_providers, help="onnxruntime providers, comma-separated (default CPU)")
    ad.add_argument("--threads", type=int, help="onnxruntime intra-op threads (a resume needs the same)")
    ad.add_argument(
        "--eval-fraction", dest="eval_fraction", type=float, help="held out when the data has no eval/ (default 0.2)"
    )
    ad.add_argument("--resume", action="store_true", help="continue the run whose state is beside --out")
    ad.add_argument("--quiet", action="store_true", help="no progress bar")
    ad.set_defaults(func=_cmd_adapt)

    co = sub.add_parser(
        "corrupt",
        help="write CIFAR-10 test images under CIFAR-10-C corruptions, as adapt/ and eval/ folders",
        description="Deterministic Gaussian noise, defocus blur, contrast and JPEG compression after the "
        "CIFAR-10-C recipe, from the real test set (no download): OUT/<clean|corruption>/{adapt,eval}/<class>/.",
    )
    co.add_argument("--data", required=True, help="CIFAR-10 (any layout subgrad train accepts)")
    co.add_argument("--out", required=True, metavar="DIR")
    co.add_argument(
        "--corruptions",
        type=lambda v: tuple(v.split(",")),
        default=CORRUPTIONS,
        help=f"default {','.join(CORRUPTIONS)}",
    )
    co.add_argument("--severity", type=int, default=DEFAULT_SEVERITY, help=f"1-5 (default {DEFAULT_SEVERITY})")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--limit", type=int, help="only the first N test images")
    co.set_defaults(func=_cmd_corrupt)
