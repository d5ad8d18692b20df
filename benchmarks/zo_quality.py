"""Forward-only training quality: test accuracy against forward passes and against seconds.

    python benchmarks/zo_quality.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/zo_quality.py --data ... --optimizers zo-adam sgd --points 8
    python benchmarks/zo_quality.py --data ... --model localnet --optimizers zo sgd

Every forward-only optimizer at its `subgrad train` defaults (zo, zo-sgd, zo-adam, hizoo), with backprop
SGD at its defaults as the reference, on the full CIFAR-10 archive.  With ``--optimizers`` only those are
run, and the other runs of an existing JSON at ``--out`` are kept (each run records its own date and machine), so
a method can be added to the same figure; compare seconds only between runs of one invocation (the
machines are noisy).  Each run evaluates at ``--points``
evenly spaced steps; the test accuracy there is plotted against the forward passes spent so far and
against training seconds (evaluation time excluded).  A backprop step counts one forward pass (its
backward is not counted: the seconds axis shows what it costs).  Writes
results/zo-quality-<device>.json and .png for LeNet (the forward-only yardstick), and
results/zo-quality-<model>-<device>.* for another ``--model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import tempfile

from bench_common import add_device_argument, machine_name, pick_device
from subgrad.data import load_cifar10
from subgrad.model_names import MODEL_NAMES
from subgrad.run_folder import versions
from subgrad.training.config import TrainConfig
from subgrad.training.loop import train
from subgrad.training.optimizers import ZO_OPTIMIZERS

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
#: the forward-only issue's bars for `zo` at its defaults on a 2-core CPU VM: (test accuracy, training seconds)
ZO_TARGETS = {"lenet": (0.55, 200), "localnet": (0.60, 3600), "resnet20": (0.40, 3600)}


def run_curve(model: str, optimizer: str, data: str, device: str, points: int, train_images: int) -> dict:
    """One training run at the pair's defaults; its evaluations as a curve."""
    cfg = TrainConfig(model=model, optimizer=optimizer, data=data, device=device, quiet=True).resolved()
    total = cfg.steps if cfg.steps is not None else round(cfg.epochs * (train_images // cfg.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, out=tmp, eval_every=max(1, total // points))
        summary = train(cfg)
        metrics = [json.loads(line) for line in (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    curve = [
        dict(
            step=m["step"],
            forward_passes=m["forward_passes"],
            train_seconds=m["train_seconds"],
            test_accuracy=m["test_accuracy"],
            train_loss=m["train_loss"],
        )
        for m in metrics
    ]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data", "out", "quiet")}
    return dict(
        date=datetime.date.today().isoformat(),
        machine=machine_name(device),
        settings=settings,
        curve=curve,
        test_accuracy=summary["test_accuracy"],
        train_seconds=summary["train_seconds"],
        forward_passes=summary["forward_passes"],
    )


def plot(runs: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_passes, by_seconds) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs.items():
        style = dict(
            marker="o",
            markersize=3,
            linestyle="--" if name not in ZO_OPTIMIZERS else "-",
            label=f"{name} ({run['test_accuracy']:.1%})" + ("" if name in ZO_OPTIMIZERS else ", backprop"),
        )
        by_passes.plot([p["forward_passes"] for p in run["curve"]], [p["test_accuracy"] for p in run["curve"]], **style)
        by_seconds.plot([p["train_seconds"] for p in run["curve"]], [p["test_accuracy"] for p in run["curve"]], **style)
    by_passes.set_xscale("log")
    by_passes.set_xlabel("forward passes of one batch (log)")
    by_seconds.set_xlabel("training seconds")
    for ax in (by_passes, by_seconds):
        ax.set_ylabel("test accuracy")
        ax.axhline(0.1, color="grey", linewidth=0.8)  # chance
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def target_line(model: str, accuracy: float, seconds: float) -> str:
    """Whether a `zo` run at its defaults clears its bar (``ZO_TARGETS``); a verdict for CPU runs only."""
    bar, budget = ZO_TARGETS[model]
    met = accuracy >= bar and seconds <= budget
    return (
        f"zo target on a 2-core CPU VM: >= {bar:.0%} test accuracy in <= {budget} s; "
        f"this run {accuracy:.1%} in {seconds:.0f} s: {'met' if met else 'not met'}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 (any layout subgrad train accepts)")
    parser.add_argument("--model", default="lenet", choices=MODEL_NAMES)
    parser.add_argument("--optimizers", nargs="+", default=[*ZO_OPTIMIZERS, "sgd"])
    parser.add_argument("--points", type=int, default=12, help="evaluations per run")
    add_device_argument(parser)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = pick_device(args.device).type
    train_images = len(load_cifar10(args.data).train_labels)
    stem = args.out / ("zo-quality-" + ("" if args.model == "lenet" else f"{args.model}-") + device)
    runs = json.loads(stem.with_suffix(".json").read_text())["runs"] if stem.with_suffix(".json").exists() else {}
    for optimizer in args.optimizers:
        runs[optimizer] = run = run_curve(args.model, optimizer, args.data, device, args.points, train_images)
        print(
            f"{optimizer:<8} test accuracy {run['test_accuracy']:.4f}  {run['forward_passes']:>6} forward passes  "
            f"{run['train_seconds']:.0f} s",
            flush=True,
        )
        if optimizer == "zo" and device == "cpu":
            print(target_line(args.model, run["test_accuracy"], run["train_seconds"]), flush=True)
    machine = machine_name(device)
    report = dict(
        date=datetime.date.today().isoformat(),
        device=device,
        machine=machine,
        versions=versions(),
        model=args.model,
        data=str(args.data),
        runs=runs,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    title = f"{args.model} on CIFAR-10, forward-only optimizers at their defaults ({machine})"
    plot(runs, stem.with_suffix(".png"), title)
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
