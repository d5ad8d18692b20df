"""``subgrad adapt``: an export, a folder of images, N forward-only steps, an adapted export.

Torch-free (onnxruntime, numpy, Pillow, onnx, tqdm).  The run keeps its state in a folder beside the
output, ``<out>.adapt-state/`` (``state.npz``: the parameter buffer and optimizer moments; ``state.json``:
step, settings, model and data fingerprints, thread count), saved every ``checkpoint_every`` steps, at
the end and on Ctrl-C; ``resume=True`` continues from it bit for bit (same settings, data and threads).
The adapted file is written only when the last step is done, atomically: an interrupted run leaves no
partial file.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from dataclasses import asdict

import numpy as np

from subgrad.run_folder import atomic_write, atomic_write_text

from .adapt import UNLABELLED_OBJECTIVE, Adapter, AdaptSettings, entropy
from .adapt_data import Images, batch_indices, load_adapt_data

#: Steps and batch of an adaptation when not given (benchmarks/README.md "Adapting an export").
DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 64
CHECKPOINT_EVERY = 50


def state_folder(out) -> pathlib.Path:
    out = pathlib.Path(out)
    return out.with_name(out.name + ".adapt-state")


def save_state(folder: pathlib.Path, adapter: Adapter, data_fingerprint: str, extra: dict) -> None:
    state = adapter.state()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "state.npz", lambda tmp: np.savez(tmp, **state["arrays"]))
    record = dict(state["record"], data_sha256=data_fingerprint, **extra)
    atomic_write_text(folder / "state.json", json.dumps(record, indent=1) + "\n")


def load_state(folder: pathlib.Path, adapter: Adapter, data_fingerprint: str, extra: dict) -> None:
    if not (folder / "state.json").is_file() or not (folder / "state.npz").is_file():
        raise ValueError(f"--resume: no saved state in {folder}; run without --resume to start")
    record = json.loads((folder / "state.json").read_text())
    if record.get("data_sha256") != data_fingerprint:
        raise ValueError("cannot resume: the data differs from the run's (its fingerprint changed)")
    for key, value in extra.items():
        if record.get(key) != value:
            raise ValueError(f"cannot resume: {key} was {record.get(key)!r}, now {value!r}; pass the run's value")
    with np.load(folder / "state.npz", allow_pickle=False) as arrays:
        adapter.load_state(dict(arrays={k: arrays[k] for k in arrays.files}, record=record))


def evaluate(adapter: Adapter, images: Images, batch_size: int = 256) -> dict:
    """Accuracy (when labelled), the objective (mean over batches of ``batch_size``), prediction entropy and
    predicted classes on ``images``."""
    logits = adapter.logits(images.pixels, batch_size)
    labelled = adapter.settings.objective == "cross_entropy"
    objective = [
        adapter.objective(images.pixels[i : i + batch_size], images.labels[i : i + batch_size] if labelled else None)
        for i in range(0, len(images), batch_size)
    ]
    out = dict(
        objective=float(np.mean(objective)),
        entropy=entropy(logits) if len(logits) else float("nan"),
        predictions=logits.argmax(1),
    )
    if images.labels is not None:
        out["accuracy"] = float((out["predictions"] == images.labels).mean())
    return out


def adapt_file(
    model_path,
    data,
    out,
    *,
    unlabelled: bool = False,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    settings: AdaptSettings | None = None,
    providers=None,
    threads: int | None = None,
    resume: bool = False,
    eval_fraction: float = 0.2,
    progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> dict:
    """Adapt ``model_path`` on ``data`` for ``steps`` steps and write ``out``; returns the report (also in
    the written file's ``adaptation`` metadata)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    if pathlib.Path(out).resolve() == pathlib.Path(model_path).resolve():
        raise ValueError("--out is the input model; write the adapted model to another file")
    settings = settings or AdaptSettings(objective=UNLABELLED_OBJECTIVE if unlabelled else "cross_entropy")
    if unlabelled == (settings.objective == "cross_entropy"):
        raise ValueError(
            f"objective {settings.objective} does not match {'--unlabelled' if unlabelled else 'labelled'} data"
        )
    adapter = Adapter(model_path, settings, providers=providers, threads=threads)
    info = adapter.info
    data = load_adapt_data(
        data, info.class_names, (info.height, info.width), not unlabelled, eval_fraction, settings.seed
    )
    if len(data.adapt) < 1 or len(data.held_out) < 1:
        raise ValueError("the data must leave at least one image to adapt on and one held out")
    folder = state_folder(out)
    run_keys = dict(batch_size=batch_size, unlabelled=unlabelled, eval_fraction=eval_fraction)
    if resume:
        load_state(folder, adapter, data.fingerprint, run_keys)
    elif (folder / "state.json").is_file():
        raise ValueError(f"{folder} holds an earlier run's state: continue it with --resume, or delete the folder")
    before = evaluate(adapter, data.held_out)
    labels = None if unlabelled else data.adapt.labels
    bar = _progress(steps, adapter.step_count, progress)
    start, first = time.perf_counter(), adapter.step_count
    try:
        while adapter.step_count < steps:
            index = batch_indices(len(data.adapt), batch_size, settings.seed, adapter.step_count)
            loss = adapter.step(data.adapt.pixels[index], None if labels is None else labels[index])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", skipped=adapter.skipped, refresh=False)
            if adapter.step_count % checkpoint_every == 0:
                save_state(folder, adapter, data.fingerprint, run_keys)
    except KeyboardInterrupt:
        save_state(folder, adapter, data.fingerprint, run_keys)
        raise KeyboardInterrupt(
            f"interrupted at step {adapter.step_count}; nothing written to {out}; continue with --resume "
            f"(state in {folder})"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    save_state(folder, adapter, data.fingerprint, run_keys)
    after = evaluate(adapter, data.held_out)
    report = dict(
        steps=adapter.step_count,
        skipped=adapter.skipped,
        batch_size=batch_size,
        unlabelled=unlabelled,
        data_sha256=data.fingerprint,
        adapt_images=len(data.adapt),
        held_out_images=len(data.held_out),
        seconds=round(seconds, 3),
        seconds_per_step=round(seconds / max(1, adapter.step_count - first), 5),
        before={k: v for k, v in before.items() if k != "predictions"},
        after={k: v for k, v in after.items() if k != "predictions"},
        agreement=float((before["predictions"] == after["predictions"]).mean()),
        settings=asdict(settings),
        threads=threads,
    )
    adapter.write(out, report)
    return report


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=done, unit="step", dynamic_ncols=True, disable=os.environ.get("SUBGRAD_QUIET") == "1"
    )
