"""subgrad.export: trained runs -> ONNX, proven equal in onnxruntime, measured, deployable.

    exporter     export_run / export_module: torch.onnx.export(dynamo=True), checks, metadata
    validate     PyTorch vs onnxruntime on the CIFAR-10 test set -> validation.json / .md
    bench        eager vs onnxruntime latency and throughput (CPU, CUDA, TensorRT providers)
    quantize     static INT8 (QDQ, per-channel) and fp16, behind an accuracy gate
    runtime      Predictor: onnxruntime + numpy + Pillow only (no torch import)
    triton_repo  NVIDIA Triton Inference Server model repository

This file imports nothing heavy, so ``subgrad.export.runtime`` stays torch-free.

onnxruntime comes from an extra, because ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the
same module and break each other when both are present:

    pip install "subgrad[cpu]"   # CPU-only machines: onnxruntime
    pip install "subgrad[gpu]"   # NVIDIA machines:   onnxruntime-gpu
"""
from __future__ import annotations


class MissingOnnxRuntimeError(ImportError):
    """onnxruntime is not installed."""


def require_onnxruntime():
    """Import and return ``onnxruntime``, or raise a one-line error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingOnnxRuntimeError(
            "onnxruntime is not installed: pip install 'subgrad[cpu]' (CPU) or 'subgrad[gpu]' "
            "(NVIDIA GPU, onnxruntime-gpu); never both") from exc
    return onnxruntime


__all__ = ["require_onnxruntime", "MissingOnnxRuntimeError"]
