"""`subgrad run`: the main job.  Train, export, validate, benchmark, and write ``report.md``.

Everything lands in one run folder (default ``runs/main``): the training run's files, ``model.onnx``,
``validation.json`` / ``validation.md``, ``bench.json`` and ``report.md``, which links ``curves.png``.
"""

from __future__ import annotations

import json
import pathlib
import sys


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def run_pipeline(config=None, bench_runs: int | None = None, validate_batch_sizes=None, **settings) -> dict:
    """Run the whole job; returns {summary, validation, bench, report}.  Raises on bad input (one line).

    ``config`` is a :class:`subgrad.training.config.TrainConfig` (default: its defaults with ``out="runs/main"``);
    ``settings`` are TrainConfig fields applied over it (``run_pipeline(data=..., model="resnet20")``).
    """
    import dataclasses

    from subgrad.export.bench import TIMED_RUNS, bench, render_table
    from subgrad.export.exporter import export_run
    from subgrad.export.validate import BATCH_SIZES, validate

    from .data import DataError, load_cifar10
    from .run_folder import atomic_write_text
    from .training.config import TrainConfig
    from .training.loop import train

    config = dataclasses.replace(config or TrainConfig(out="runs/main"), **settings)
    data, quiet = config.data, config.quiet
    try:  # fail before training when the data is missing or unreadable
        load_cifar10(data)
    except DataError as exc:
        raise DataError(str(exc) if "--data" in str(exc) else f"--data {data}: {exc}") from None
    run = pathlib.Path(config.out)
    _log(quiet, f"[1/4] training {config.model} with {config.optimizer} into {run}")
    summary = train(config)
    _log(quiet, "[2/4] exporting to ONNX")
    code = config.model  # named by the caller of this run: its code may be rebuilt for export and validation
    onnx_path = export_run(run, run / "model.onnx", code=code)
    _log(quiet, "[3/4] validating PyTorch vs onnxruntime on the test set")
    validation = validate(onnx_path, run, data, batch_sizes=validate_batch_sizes or BATCH_SIZES, code=code)
    _log(
        quiet,
        f"      {'passed' if validation['passed'] else 'FAILED: ' + '; '.join(validation['failures'])}: "
        f"top-1 agreement {validation['agreement']:.5f}, max |logit diff| {validation['max_abs_diff']:.3g} "
        f"over {validation['images']} images",
    )
    bench_runs = TIMED_RUNS if bench_runs is None else bench_runs
    _log(quiet, f"[4/4] benchmarking ({bench_runs} timed runs per batch size)")
    timing = bench(onnx_path, runs=bench_runs, run_dir=run, code=code)
    atomic_write_text(run / "bench.json", json.dumps(timing, indent=1))
    report = render_report(summary, validation, timing)
    atomic_write_text(run / "report.md", report)
    _log(quiet, render_table(timing))  # the CLI prints the report's path on stdout
    return dict(summary=summary, validation=validation, bench=timing, report=str(run / "report.md"))


def render_report(summary: dict, validation: dict, timing: dict) -> str:
    v = validation
    lines = [
        f"# subgrad run: {summary['model']} / {summary['optimizer']}",
        "",
        "## Training",
        "",
        f"- test accuracy **{summary['test_accuracy']:.4f}**, train accuracy {summary['train_accuracy']:.4f}",
        f"- {summary['steps']} steps ({summary['epochs']} epochs), {summary['train_seconds']:.1f} s on "
        f"{summary['device']} ({summary['device_name']}), {summary['images_per_second']:.0f} img/s, "
        f"{summary['forward_passes']} forward passes",
        "",
        "![curves](curves.png)",
        "",
        "## ONNX validation (`model.onnx`)",
        "",
        f"- {'PASSED' if v['passed'] else 'FAILED: ' + '; '.join(v['failures'])}: top-1 agreement "
        f"{v['agreement']:.5f}, max |logit diff| {v['max_abs_diff']:.3g} over {v['images']} test images at "
        f"batch sizes {', '.join(str(r['batch_size']) for r in v['per_batch_size'])}",
        f"- accuracy PyTorch {v['accuracy_torch']:.4f}, onnxruntime {v['accuracy_onnx']:.4f}",
        "",
        f"## Speed (onnxruntime {timing['onnxruntime']} vs PyTorch eager, {timing['threads']} threads, "
        f"{timing['runs']} runs, {timing['cpu']})",
        "",
        "| provider | batch | eager p50 ms | onnxruntime p50 ms | p99 ms | p50 speed-up | throughput ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in timing["results"]:
        if "error" in res:
            lines.append(f"| {res['provider']} | failed: {res['error']} | | | | | |")
            continue
        for bs, row in res["batches"].items():
            lines.append(
                f"| {res['provider_used']} | {bs} | {row['torch']['p50_ms']:.3f} | "
                f"{row['onnxruntime']['p50_ms']:.3f} | {row['onnxruntime']['p99_ms']:.3f} | "
                f"{row['p50_speedup']:.2f}x | {row['throughput_ratio']:.2f}x |"
            )
    lines += ["", "Files: `model.onnx`, `validation.md`, `bench.json`, `summary.json`, `metrics.jsonl`, `model.pt`."]
    return "\n".join(lines) + "\n"
