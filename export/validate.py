"""`subgrad validate`: the ONNX model predicts what the PyTorch model predicts, on the real test set.

Both run the whole CIFAR-10 test set at each batch size (default 1, 2, 7, 64, 256: odd sizes catch a
batch dimension that was baked in or a per-batch bug).  PyTorch gets training's normalised float input;
onnxruntime gets what the deploy runtime feeds it (``Predictor.preprocess``: raw pixels when the graph
normalises, else the runtime's numpy normalisation), so the check covers the deploy path too.

Passes when top-1 agreement >= ``min_agreement`` and max |logit difference| <= ``max_abs_diff`` at every
batch size.  Writes ``validation.json`` and ``validation.md`` beside the model.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from subgrad.run_folder import atomic_write_text

from .runtime import Predictor

BATCH_SIZES = (1, 2, 7, 64, 256)


def torch_logits(model, pixels: np.ndarray, mean, std, batch_size: int) -> np.ndarray:
    """Logits of ``model`` for uint8 NHWC pixels, normalised by training's own loader."""
    from subgrad.data import DeviceLoader

    loader = DeviceLoader(pixels, np.zeros(len(pixels), np.int64), mean, std, batch_size, "cpu")
    with torch.inference_mode():
        return torch.cat([model(x) for x, _ in loader.epoch(0)]).numpy()


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict:
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    return dict(
        agreement=float((ref_top == cand_top).mean()),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        p99_abs_diff=float(np.percentile(diff, 99)),
        accuracy_torch=float((ref_top == labels).mean()),
        accuracy_onnx=float((cand_top == labels).mean()),
        disagreements=int((ref_top != cand_top).sum()),
    )


def validate(
    model_path,
    run_dir,
    data,
    batch_sizes=BATCH_SIZES,
    min_agreement: float = 0.999,
    max_abs_diff: float = 1e-4,
    limit: int | None = None,
    providers=None,
    write: bool = True,
    code: str | None = None,
) -> dict:
    """Compare PyTorch and onnxruntime on the test set; returns the report (``passed``, ``failures``, ...)."""
    from subgrad.data import load_cifar10

    from .exporter import load_run

    if not 0 <= min_agreement <= 1 or max_abs_diff < 0:
        raise ValueError("--min-agreement must be in [0, 1] and --max-abs-diff >= 0")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {batch_sizes}")
    model_path = pathlib.Path(model_path)
    predictor = Predictor(model_path, providers)
    info = predictor.info
    model, record, _ = load_run(run_dir, code)
    if info.model_name != record["model"] or not np.allclose(info.mean, record["mean"], rtol=0, atol=0):
        raise ValueError(f"{model_path} was not exported from {run_dir} (model or normalisation differ)")
    dataset = load_cifar10(data)
    pixels, labels = dataset.test_images[:limit], dataset.test_labels[:limit]

    rows = []
    for bs in batch_sizes:
        ref = torch_logits(model, pixels, record["mean"], record["std"], bs)
        got = predictor.logits_from_pixels(pixels, bs)
        rows.append(dict(batch_size=bs, **compare(ref, got, labels)))
    worst_agreement = min(r["agreement"] for r in rows)
    worst_diff = max(r["max_abs_diff"] for r in rows)
    failures = []
    if worst_agreement < min_agreement:
        failures.append(
            f"top-1 agreement {worst_agreement:.5f} < {min_agreement} "
            f"(batch {min(rows, key=lambda r: r['agreement'])['batch_size']})"
        )
    if worst_diff > max_abs_diff:
        failures.append(
            f"max |logit difference| {worst_diff:.3g} > {max_abs_diff:g} "
            f"(batch {max(rows, key=lambda r: r['max_abs_diff'])['batch_size']})"
        )
    report = dict(
        model=str(model_path),
        run=str(run_dir),
        images=int(len(labels)),
        provider=predictor.session.get_providers()[0],
        agreement=worst_agreement,
        max_abs_diff=worst_diff,
        accuracy_torch=rows[-1]["accuracy_torch"],
        accuracy_onnx=rows[-1]["accuracy_onnx"],
        thresholds=dict(min_agreement=min_agreement, max_abs_diff=max_abs_diff),
        passed=not failures,
        failures=failures,
        per_batch_size=rows,
        preprocessing_in_graph=info.preprocessing_in_graph,
    )
    if write:
        atomic_write_text(model_path.parent / "validation.json", json.dumps(report, indent=1))
        atomic_write_text(model_path.parent / "validation.md", render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    lines = [
        f"# Validation of `{pathlib.Path(report['model']).name}`",
        "",
        f"{report['images']} CIFAR-10 test images, PyTorch eager vs onnxruntime ({report['provider']}); "
        f"thresholds: agreement >= {report['thresholds']['min_agreement']}, max |logit diff| <= "
        f"{report['thresholds']['max_abs_diff']:g}.",
        "",
        f"**{verdict}**",
        "",
        "| batch | agreement | max abs diff | mean abs diff | p99 abs diff | acc torch | acc onnx |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["per_batch_size"]:
        lines.append(
            f"| {r['batch_size']} | {r['agreement']:.5f} | {r['max_abs_diff']:.3g} | "
            f"{r['mean_abs_diff']:.3g} | {r['p99_abs_diff']:.3g} | {r['accuracy_torch']:.4f} | "
            f"{r['accuracy_onnx']:.4f} |"
        )
    return "\n".join(lines) + "\n"
