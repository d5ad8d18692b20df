"""subgrad.export: ONNX export, onnxruntime validation and the torch-free runtime (growing).

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
