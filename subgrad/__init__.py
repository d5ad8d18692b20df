"""subgrad: zeroth-order and fused first-order optimizers whose updates are Triton kernels.

``subgrad.kernels`` holds the kernels and their torch twins, :class:`FlatParams` packs a model's
parameters so each kernel pass is one launch, and ``subgrad.export`` takes trained models to ONNX.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("subgrad")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from .flat import FlatGroup, FlatParams, StaleFlatParamsError

__all__ = ["__version__", "FlatParams", "FlatGroup", "StaleFlatParamsError"]
