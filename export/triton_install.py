"""Which Triton Inference Server `subgrad serve` runs (:func:`find_server`): a ``tritonserver`` on PATH
(NVIDIA's Triton containers), which serves the ``onnxruntime`` repository variant, or the server bundled
in the ``nvidia-pytriton`` wheel of the ``serve`` extra (Triton 2.51 with the python backend only), which
serves the ``python`` variant; and what a repository holds (:func:`repository_models`).
"""

from __future__ import annotations

import pathlib
import shutil
import sys
from dataclasses import dataclass

STUB_NAME = "triton_python_backend_stub"


class ServeError(RuntimeError):
    """The server cannot be started or kept serving (the message says why and what to do)."""


@dataclass(frozen=True)
class ServerBinary:
    """A Triton Inference Server installation."""

    executable: pathlib.Path
    backend: str  # the repository variant (triton_repo.BACKENDS) MODEL.onnx is packaged as for this server
    runs_onnxruntime: bool  # whether it has Triton's onnxruntime backend (the bundled server has not)
    origin: str  # where it came from, for messages
    library_path: pathlib.Path | None = None  # prepended to LD_LIBRARY_PATH
    python_backend: pathlib.Path | None = None  # folder with libtriton_python.so, when not the server's default
    stub: pathlib.Path | None = None  # the python-backend stub for this Python


def find_server() -> ServerBinary:
    """``tritonserver`` on PATH, else the ``serve`` extra's bundled server, else a ServeError saying how."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(pathlib.Path(on_path), "onnxruntime", True, f"{on_path} (on PATH)")
    try:
        import pytriton
    except ImportError:
        raise ServeError(
            "no Triton Inference Server found: pip install 'subgrad[cpu,serve]' (a bundled server "
            "with the python backend), or run inside NVIDIA's Triton container (tritonserver on "
            "PATH)"
        ) from None
    root = pathlib.Path(pytriton.__file__).resolve().parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no python-backend stub for Python {version}; use Python 3.8-3.13")
    return ServerBinary(
        root / "tritonserver" / "bin" / "tritonserver",
        "python",
        False,
        "the serve extra (nvidia-pytriton)",
        library_path=root.parent / "nvidia_pytriton.libs",
        python_backend=root / "tritonserver" / "backends" / "python",
        stub=stub,
    )


def repository_models(repository: pathlib.Path) -> dict[str, str]:
    """{model name: "onnxruntime" | "python"} of every model folder in a repository."""
    models = {}
    for config in sorted(pathlib.Path(repository).glob("*/config.pbtxt")):
        text = config.read_text()
        models[config.parent.name] = "python" if 'backend: "python"' in text else "onnxruntime"
    return models
