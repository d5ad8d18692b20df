"""`subgrad package`: an NVIDIA Triton Inference Server model repository for an exported model.

    DIR/<name>/config.pbtxt     max_batch_size, inputs, outputs, dynamic_batching, instance_group
    DIR/<name>/labels.txt       one class name per line (Triton's classification extension reads it)
    DIR/<name>/1/model.onnx     version 1

Two backends (``--backend``):

* ``onnxruntime`` (default): ``platform: "onnxruntime_onnx"``, served by Triton's onnxruntime backend,
  as in NVIDIA's Triton containers;
* ``python``: ``backend: "python"``, ``1/model.py`` (triton_python_model.py) running subgrad's
  torch-free runtime (``1/subgrad_runtime.py``, a copy of runtime.py); besides the model's tensor input
  it takes ``image_bytes`` (``TYPE_STRING``, encoded JPEG/PNG files), both optional, one per request.
  This is what the server of the ``serve`` extra runs (it has no onnxruntime backend).

Input and output names, types and per-item dims come from the ONNX graph itself (the batch dimension
is implicit in Triton when ``max_batch_size > 0``), so the config cannot drift from the model.
"""

from __future__ import annotations

import pathlib
import re
import shutil

import onnx

from subgrad.run_folder import atomic_write, atomic_write_text

from . import runtime, triton_python_model
from .runtime import ModelFileError, ModelInfo

BACKENDS = ("onnxruntime", "python")
#: instance kind per backend when none is given: the python backend's instances are host processes
DEFAULT_KIND = {"onnxruntime": "KIND_GPU", "python": "KIND_CPU"}

#: ONNX tensor element types -> Triton's DataType enum names (model_config.proto).
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
}


def _io(value_info, what: str) -> tuple[str, str, list[int]]:
    tensor = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise ValueError(f"{what} {value_info.name!r} has no dynamic batch dimension; re-export with `subgrad export`")
    if tensor.elem_type not in TRITON_TYPES:
        raise ValueError(f"{what} {value_info.name!r}: element type {tensor.elem_type} has no Triton equivalent")
    return value_info.name, TRITON_TYPES[tensor.elem_type], dims[1:]


def render_config(
    name: str,
    inputs,
    outputs,
    max_batch_size: int,
    instances: int,
    kind: str,
    preferred_batch_sizes: list[int],
    max_queue_delay_us: int,
    backend: str = "onnxruntime",
) -> str:
    def tensor(entry, extra=""):
        n, t, dims = entry
        return f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, dims))} ]{extra}\n  }}'

    optional = ""
    if backend == "python":
        inputs = [*inputs, (triton_python_model.IMAGE_INPUT, "TYPE_STRING", [1])]
        optional = "\n    optional: true"
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"' if backend == "onnxruntime" else 'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(tensor(i, optional) for i in inputs),
        "]",
        "output [",
        ",\n".join(tensor(o, '\n    label_filename: "labels.txt"') for o in outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        f"  {{\n    count: {instances}\n    kind: {kind}\n  }}",
        "]",
    ]
    return "\n".join(lines) + "\n"


def package_triton(
    model_path,
    repo,
    name: str | None = None,
    max_batch_size: int = 256,
    instances: int = 1,
    kind: str | None = None,
    max_queue_delay_us: int = 0,
    version: int = 1,
    backend: str = "onnxruntime",
) -> pathlib.Path:
    """Write the model repository entry; returns the model's folder (``repo/name``).

    ``kind`` defaults to :data:`DEFAULT_KIND` of the backend.  ``max_queue_delay_us`` is how long the
    dynamic batcher holds a request for more to join it; at 0 it still batches whatever queued while the
    instance was busy, and a lone request does not wait (measured in benchmarks/README.md, "Serving")."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    kind = kind or DEFAULT_KIND[backend]
    model_path = pathlib.Path(model_path)
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: no such model file")
    try:
        proto = onnx.load(str(model_path))
    except Exception as exc:  # DecodeError and friends: not an ONNX protobuf
        raise ModelFileError(f"{model_path} is not an ONNX model ({type(exc).__name__})") from None
    info = ModelInfo.from_props({p.key: p.value for p in proto.metadata_props}, str(model_path))
    name = name or model_path.stem
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(
            f"--name {name!r}: use letters, digits, '_', '-', '.' (it becomes a folder and the model's name in Triton)"
        )
    if max_batch_size < 1 or instances < 1 or version < 1 or max_queue_delay_us < 0:
        raise ValueError("--max-batch-size, --instances and --version must be >= 1, --max-queue-delay-us >= 0")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise ValueError(f"--kind must be KIND_GPU or KIND_CPU, got {kind!r}")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [_io(v, "input") for v in proto.graph.input if v.name not in initializers]
    outputs = [_io(v, "output") for v in proto.graph.output]
    preferred = sorted({b for b in (8, 32, 128, max_batch_size) if b <= max_batch_size})
    folder = pathlib.Path(repo) / name
    version_folder = folder / str(version)
    version_folder.mkdir(parents=True, exist_ok=True)
    files = [(version_folder / "model.onnx", model_path)]
    if backend == "python":
        files += [
            (version_folder / "model.py", pathlib.Path(triton_python_model.__file__)),
            (version_folder / "subgrad_runtime.py", pathlib.Path(runtime.__file__)),
        ]
    for target, source in files:
        atomic_write(target, lambda p, source=source: shutil.copyfile(source, p))
    atomic_write_text(folder / "labels.txt", "\n".join(info.class_names) + "\n")
    atomic_write_text(
        folder / "config.pbtxt",
        render_config(name, inputs, outputs, max_batch_size, instances, kind, preferred, max_queue_delay_us, backend),
    )
    return folder
