"""subgrad.export: trained runs -> ONNX, proven equal in onnxruntime, measured, deployable.

    exporter     export_run / export_module: torch.onnx.export(dynamo=True), checks, metadata
    validate     PyTorch vs onnxruntime on the CIFAR-10 test set -> validation.json / .md
    bench        eager vs onnxruntime latency and throughput (CPU, CUDA, TensorRT providers)
    quantize     static INT8 (QDQ, per-channel) and fp16, behind an accuracy gate
    runtime      Predictor: onnxruntime + numpy + Pillow only (no torch import)
    triton_repo  NVIDIA Triton Inference Server model repository (onnxruntime or python backend)
    triton_python_model  the python-backend model that repository runs (copied as model.py)
    serve        `subgrad serve`: a real Triton Inference Server on such a repository
    http_guard   the bounded HTTP front that keeps that server alive under oversized requests

This file imports nothing heavy (runtime.py needs only numpy until a session opens), so
``subgrad.export.runtime`` stays torch-free.

onnxruntime comes from an extra, because ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the
same module and break each other when both are present:

    pip install "subgrad[cpu]"   # CPU-only machines: onnxruntime
    pip install "subgrad[gpu]"   # NVIDIA machines:   onnxruntime-gpu
"""

from __future__ import annotations

from .runtime import MissingOnnxRuntimeError, require_onnxruntime  # numpy only, no torch

__all__ = ["require_onnxruntime", "MissingOnnxRuntimeError"]
