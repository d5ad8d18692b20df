"""`subgrad quantize`: static INT8 (QDQ, per-channel) or fp16, gated on measured accuracy.

INT8: onnxruntime's ``quantize_static`` with QDQ nodes, per-channel int8 weights and uint8 activations,
calibrated (MinMax) on training images spread over the whole training set.  Both models then classify
the full test set in onnxruntime; the INT8 model is written only when its accuracy drop is at most
``max_drop`` points (default 1.0); otherwise nothing is written and the report says why.

fp16: weights and activations in float16 for GPU providers, inputs and outputs kept float32
(``keep_io_types``); onnxruntime's CPU provider lacks fp16 kernels for most ops, so accuracy is measured
only when the session can run.  The report (``quantization-<mode>.json``) lands beside the output
either way.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import numpy as np
import onnx

from subgrad.run_folder import atomic_write_text

from .bench import time_runs
from .runtime import ModelInfo, Predictor


def _accuracy(path, pixels, labels) -> float:
    logits = Predictor(path, ["CPUExecutionProvider"]).logits_from_pixels(pixels, 256)
    return float((logits.argmax(1) == labels).mean())


def _latency_ms(path, info: ModelInfo, batch: int, runs: int = 30) -> float:
    session = Predictor(path, ["CPUExecutionProvider"]).session
    pixels = np.random.default_rng(0).integers(0, 256, (batch, info.height, info.width, 3), dtype=np.uint8)
    feed = {info.input_name: info.prepare(pixels)}
    return float(np.median(time_runs(lambda: session.run(None, feed), runs, warmup=5)) * 1e3)


def _copy_metadata(source: onnx.ModelProto, target: onnx.ModelProto, extra: dict) -> None:
    del target.metadata_props[:]
    for prop in source.metadata_props:
        target.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in extra.items():
        target.metadata_props.add(key=key, value=json.dumps(value))


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training images."""

    def __init__(self, info: ModelInfo, pixels: np.ndarray, batch_size: int = 64):
        self.info, self.pixels, self.batch_size, self.index = info, pixels, batch_size, 0

    def get_next(self):
        if self.index >= len(self.pixels):
            return None
        chunk = self.pixels[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return {self.info.input_name: self.info.prepare(chunk)}

    def rewind(self):
        self.index = 0


def quantize(
    model_path,
    data,
    out=None,
    mode: str = "int8",
    max_drop: float = 1.0,
    calibration_images: int = 1024,
    limit: int | None = None,
    seed: int = 0,
) -> dict:
    """Quantize ``model_path``; returns the report, ``written`` says whether ``out`` was written."""
    from subgrad.data import load_cifar10

    if mode not in ("int8", "fp16"):
        raise ValueError(f"--mode must be int8 or fp16, got {mode!r}")
    if calibration_images < 1:  # a negative max_drop is allowed: it demands an accuracy gain
        raise ValueError(f"--calibration-images must be >= 1, got {calibration_images}")
    model_path = pathlib.Path(model_path)
    out = pathlib.Path(out) if out else model_path.with_name(f"{model_path.stem}.{mode}.onnx")
    if out.resolve() == model_path.resolve():
        raise ValueError("--out must differ from the input model")
    info = Predictor(model_path, ["CPUExecutionProvider"]).info
    source = onnx.load(str(model_path))
    dataset = load_cifar10(data)
    pixels, labels = dataset.test_images[:limit], dataset.test_labels[:limit]
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out.parent if out.parent.exists() else None)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        if mode == "int8":
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(model_path), str(tmp))  # shape inference + graph optimisation, as ORT advises
            rng = np.random.default_rng(seed)
            pick = np.sort(
                rng.choice(len(dataset.train_images), min(calibration_images, len(dataset.train_images)), replace=False)
            )
            quantize_static(
                str(tmp),
                str(tmp),
                _Calibration(info, dataset.train_images[pick]),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            settings = dict(
                mode="int8",
                format="QDQ",
                per_channel=True,
                activations="uint8",
                weights="int8",
                calibration="MinMax",
                calibration_images=int(len(pick)),
            )
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(source, keep_io_types=True), str(tmp))
            settings = dict(mode="fp16", keep_io_types=True)
        quantized = onnx.load(str(tmp))
        _copy_metadata(source, quantized, {"quantization": settings})
        onnx.save(quantized, str(tmp))

        acc_fp32 = _accuracy(model_path, pixels, labels)
        report = dict(
            model=str(model_path),
            out=str(out),
            images=int(len(labels)),
            settings=settings,
            accuracy_fp32=acc_fp32,
            max_drop_points=max_drop,
            size_fp32_bytes=model_path.stat().st_size,
            size_quantized_bytes=tmp.stat().st_size,
        )
        report["size_ratio"] = report["size_quantized_bytes"] / report["size_fp32_bytes"]
        try:
            acc_q = _accuracy(tmp, pixels, labels)
        except Exception as exc:  # fp16 on the CPU provider: no kernels for some ops
            acc_q = None
            report["accuracy_note"] = f"not measurable on CPUExecutionProvider ({str(exc).splitlines()[0][:160]})"
        report["accuracy_quantized"] = acc_q
        report["accuracy_drop_points"] = None if acc_q is None else (acc_fp32 - acc_q) * 100
        if acc_q is not None:
            for batch in (1, 256):
                fp32_ms, q_ms = _latency_ms(model_path, info, batch), _latency_ms(tmp, info, batch)
                report[f"speedup_batch{batch}"] = fp32_ms / q_ms
                report[f"latency_ms_batch{batch}"] = dict(fp32=fp32_ms, quantized=q_ms)
        drop = report["accuracy_drop_points"]
        report["passed"] = drop is not None and drop <= max_drop or (drop is None and mode == "fp16")
        if report["passed"]:
            os.replace(tmp, out)
            report["written"] = True
        else:
            report["written"] = False
            report["reason"] = (
                f"accuracy drops {drop:.2f} points ({acc_fp32:.4f} -> {acc_q:.4f}) > --max-drop "
                f"{max_drop}; {out} not written"
            )
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(out.parent / f"quantization-{mode}.json", json.dumps(report, indent=1))
    return report
