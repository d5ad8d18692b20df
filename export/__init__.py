"""subgrad.export: trained runs -> ONNX, proven equal in onnxruntime, measured, deployable.

    exporter     export_run / export_module: torch.onnx.export(dynamo=True), checks, metadata
    validate     PyTorch vs onnxruntime on the CIFAR-10 test set -> validation.json / .md
    bench        eager vs onnxruntime latency and throughput (CPU, CUDA, TensorRT providers)
    quantize     static INT8 (QDQ, per-channel) and fp16, behind an accuracy gate
    runtime      Predictor: onnxruntime + numpy + Pillow only (no torch import)
    triton_repo  NVIDIA Triton Inference Server model repository (onnxruntime or python backend)
    triton_python_model  the python-backend model that repository runs (copied as model.py)
    serve        `subgrad serve`: a real Triton Inference Server on such a repository, loopback by default,
                 its admin API behind a key, restarted when it dies
    triton_install  which Triton server: tritonserver on PATH or the serve extra's
    http_guard   the HTTP front before that server: connection bounds, the open API only, checked requests
    http_relay   the front's connections (asyncio protocols): client state machine, Triton connection
    http_framing strict HTTP/1.1 request heads, the open routes, the front's own answers
    infer_check  an inference request against its model: every declared tensor backed by the data sent

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
