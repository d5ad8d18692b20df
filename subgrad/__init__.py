"""subgrad: zeroth-order and fused first-order optimizers whose updates are Triton kernels.

``subgrad.kernels`` holds the kernels and their torch twins, :class:`FlatParams` packs a model's
parameters so each kernel pass is one launch, and ``subgrad.export`` takes trained models to ONNX.

Importing ``subgrad`` does not import torch: the deploy runtime (``subgrad.export.runtime``) must load
on machines that have only onnxruntime, numpy and Pillow, so torch-backed names load on first use.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("subgrad")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {"FlatParams": ".flat", "FlatGroup": ".flat", "StaleFlatParamsError": ".flat"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'subgrad' has no attribute {name!r}")


__all__ = ["__version__", "FlatParams", "FlatGroup", "StaleFlatParamsError"]
