"""`subgrad export`: a training run folder -> one self-describing, checked ONNX file.

``torch.onnx.export(..., dynamo=True)`` traced at batch 2 with a dynamic batch dimension, opset 18,
model in eval mode.  Before anything is written the model must pass ``onnx.checker.check_model
(full_check=True)`` and strict shape inference; the file is then written atomically (temp + rename).
``metadata_props`` carry everything :class:`subgrad.export.runtime.Predictor` needs (the keys are listed
in :func:`build_metadata`); values that are not plain strings are JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import sys
import tempfile

import onnx
import torch
import torch.nn as nn

from subgrad.run_folder import atomic_write

from .runtime import METADATA_FORMAT

#: Smallest opset this exporter targets (the issue asks for 18 or newer).
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(ValueError):
    """A model could not be exported or the result did not pass the ONNX checks (one-line reason)."""


class WithPreprocessing(nn.Module):
    """Raw uint8 NHWC pixels in, logits out: training's normalisation as the first graph ops.

    The float32 ops are those of :class:`subgrad.data.DeviceLoader` and of
    :func:`subgrad.export.runtime.normalize` (cast, subtract 255 mean, divide by 255 std), so the graph
    gives the Python preprocessing's numbers.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean255", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std255", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        return self.model((x - self.mean255) / self.std255)


# -- run folders ------------------------------------------------------------------------------------
def load_run(run_dir, code: str | None = None) -> tuple[nn.Module, dict, dict]:
    """(model in eval mode on CPU, config.json record, summary.json or {}) of a finished training run.  A run
    of the user's own constructor rebuilds it only when ``code`` names it (``--code``: named by the user,
    not read from the folder)."""
    from subgrad.models import build_model
    from subgrad.run_folder import checkpoints, load_checkpoint

    run = pathlib.Path(run_dir)
    if not (run / "config.json").is_file():
        raise ExportError(f"{run}: no config.json; pass a run folder written by `subgrad train`")
    record = json.loads((run / "config.json").read_text())
    weights = run / "model.pt"
    if not weights.is_file():
        found = checkpoints(run)
        if not found:
            raise ExportError(f"{run}: no model.pt and no checkpoints; the run has not saved weights yet")
        weights = found[-1]
    try:  # build_model checks the name: one of the three kinds, and code only when named
        model = build_model(record.get("model"), code_named=code, **record.get("model_config", {}))
    except ValueError as exc:
        raise ExportError(f"{run}: {exc}") from None
    model.load_state_dict(load_checkpoint(weights)["model"])
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return model.eval(), record, summary


def build_metadata(record: dict, summary: dict, with_preprocessing: bool, opset: int) -> dict[str, str]:
    """The ``metadata_props`` of an export.  Keys (values JSON unless noted):

    subgrad.format (string), class_names, input_name (string), input_layout (string "NCHW" or "NHWC"),
    input_dtype (string), input_size {height, width, channels}, mean, std (per channel, [0, 1] units),
    preprocessing_in_graph, preprocessing (string, how to prepare pixels), model_name (string),
    model_config, training {optimizer, test_accuracy, train_accuracy, steps, train_seconds, device, ...},
    versions {subgrad, torch, onnx, onnxscript, python}, opset.
    """
    import platform

    import onnxscript

    from subgrad import __version__

    mean, std = [float(v) for v in record["mean"]], [float(v) for v in record["std"]]
    training = {
        k: summary.get(k, record.get(k))
        for k in (
            "optimizer",
            "test_accuracy",
            "train_accuracy",
            "test_loss",
            "steps",
            "epochs",
            "train_seconds",
            "forward_passes",
            "device",
            "device_name",
        )
    }
    training.update(
        seed=record.get("seed"),
        batch_size=record.get("batch_size"),
        lr=record.get("lr"),
        schedule=record.get("schedule"),
    )
    props = {
        "subgrad.format": METADATA_FORMAT,
        "class_names": record["classes"],
        "input_name": INPUT_NAME,
        "input_layout": "NHWC" if with_preprocessing else "NCHW",
        "input_dtype": "uint8" if with_preprocessing else "float32",
        "input_size": {"height": 32, "width": 32, "channels": 3},
        "mean": mean,
        "std": std,
        "preprocessing_in_graph": with_preprocessing,
        "preprocessing": (
            "raw RGB uint8 pixels, NHWC"
            if with_preprocessing
            else "RGB, resize to 32x32 (bilinear), float32 (pixel - 255*mean) / (255*std), NCHW"
        ),
        "model_name": record["model"],
        "model_config": record.get("model_config", {}),
        "training": training,
        "versions": {
            "subgrad": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "python": platform.python_version(),
        },
        "opset": opset,
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}


# -- export -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_fds():
    """Silence the exporter's progress lines and graph dumps (they go to fds 1/2 from C++ and loggers)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def export_failure_reason(exc: BaseException) -> str:
    """One line from an exporter exception chain: the unsupported op when one is named, else the root cause."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    text = "\n".join(str(e) for e in chain)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)
    if op:
        return f"no ONNX translation for the op {op.group(1)}"
    root = chain[-1]
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(root)).splitlines() if ln.strip()]
    where = re.search(r"File: ([^ ]+) in (\w+), code: (.+)", text)  # torch.export's user-code annotation
    detail = lines[0][:240] if lines else type(root).__name__
    if where:
        detail += f" (at {where.group(1)} in {where.group(2)}: {where.group(3).strip()[:80]})"
    return f"{type(root).__name__}: {detail}"


def check_onnx(proto: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """Full checker + strict, type-checked shape inference; returns the shape-inferred model."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # ValidationError / InferenceError: both mean "not a valid model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{what} failed the ONNX checks: {first[:300]}") from None


def export_module(
    model: nn.Module,
    out,
    metadata: dict[str, str] | None = None,
    *,
    example=None,
    opset: int = OPSET,
    name: str | None = None,
    more_metadata=None,
) -> pathlib.Path:
    """Export ``model`` (eval mode) with a dynamic batch dimension, check it, write ``out`` atomically.

    ``example`` is one input batch; its batch size must be >= 2 so the exporter cannot specialise on it
    (default: float32 [2, 3, 32, 32]).  ``more_metadata(proto)`` may add keys computed from the graph.
    """
    name = name or type(model).__name__
    example = torch.zeros(2, 3, 32, 32) if example is None else example
    if example.shape[0] < 2:
        raise ExportError("trace with a batch of at least 2, or the batch dimension is baked in as 1")
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with _quiet_fds(), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
                optimize=True,
            )
    except Exception as exc:  # the exporter's own error types vary across torch releases
        raise ExportError(f"cannot export {name} to ONNX: {export_failure_reason(exc)}") from None
    proto = program.model_proto
    if proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value:
        raise ExportError(f"{name}: the exported batch dimension is fixed; the model must not depend on batch size")
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    for key, value in (more_metadata(proto) if more_metadata else {}).items():
        proto.metadata_props.add(key=key, value=value)
    check_onnx(proto, f"the export of {name}")
    return atomic_write(out, lambda tmp: onnx.save_model(proto, tmp))


def _source_statistics(data, metadata: dict[str, str]):
    """``more_metadata`` for :func:`export_module`: the layers' channel statistics on the training images
    of ``data`` (:mod:`subgrad.export.source_stats`), or none, with a warning, when the data is unreadable."""
    import warnings

    from subgrad.data import DataError, load_cifar10

    from . import source_stats
    from .runtime import ModelInfo

    def compute(proto) -> dict[str, str]:
        try:
            images = load_cifar10(data, download=False).train_images
        except (DataError, OSError) as exc:
            warnings.warn(
                f"no {source_stats.KEY} recorded ({exc}); `subgrad adapt --objective foa` needs them: export "
                "again with --data pointing at the training data",
                stacklevel=3,
            )
            return {}
        info = ModelInfo.from_props(metadata, "the export")
        stats = source_stats.compute(proto, info, source_stats.subset(images))
        return {source_stats.KEY: json.dumps(stats)}

    return compute


def export_run(
    run_dir,
    out,
    with_preprocessing: bool = False,
    opset: int = OPSET,
    code: str | None = None,
    data=None,
) -> pathlib.Path:
    """Export a run folder's final weights to ``out`` (see the module docstring; ``code``: :func:`load_run`).

    ``data`` (default: the run's own ``--data``) gives the training images whose layer statistics are
    recorded as ``source_statistics``; an unreadable data path skips them with a warning."""
    if opset < OPSET:
        raise ExportError(f"--opset must be >= {OPSET}, got {opset}")
    model, record, summary = load_run(run_dir, code)
    metadata = build_metadata(record, summary, with_preprocessing, opset)
    if with_preprocessing:
        model, example = (
            WithPreprocessing(model, record["mean"], record["std"]).eval(),
            torch.zeros(2, 32, 32, 3, dtype=torch.uint8),
        )
    else:
        example = torch.zeros(2, 3, 32, 32)
    source = data or record.get("data")
    stats = _source_statistics(source, metadata) if source else None
    return export_module(model, out, metadata, example=example, opset=opset, name=record["model"], more_metadata=stats)
