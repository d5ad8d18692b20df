"""`subgrad package`: an NVIDIA Triton Inference Server model repository for an exported model.

    DIR/<name>/config.pbtxt     platform "onnxruntime_onnx", max_batch_size, dynamic_batching, instance_group
    DIR/<name>/labels.txt       one class name per line (Triton's classification extension reads it)
    DIR/<name>/1/model.onnx     version 1

Input and output names, types and per-item dims come from the ONNX graph itself (the batch dimension
is implicit in Triton when ``max_batch_size > 0``), so the config cannot drift from the model.
"""
from __future__ import annotations

import pathlib
import re
import shutil

import onnx

from subgrad.runs import atomic_write

from .runtime import ModelInfo, ModelFileError

#: ONNX tensor element types -> Triton's DataType enum names (model_config.proto).
TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT8: "TYPE_INT8",
                onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
                onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64"}


def _io(value_info, what: str) -> tuple[str, str, list[int]]:
    tensor = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise ValueError(f"{what} {value_info.name!r} has no dynamic batch dimension; re-export with `subgrad export`")
    if tensor.elem_type not in TRITON_TYPES:
        raise ValueError(f"{what} {value_info.name!r}: element type {tensor.elem_type} has no Triton equivalent")
    return value_info.name, TRITON_TYPES[tensor.elem_type], dims[1:]


def render_config(name: str, inputs, outputs, max_batch_size: int, instances: int, kind: str,
                  preferred_batch_sizes: list[int], max_queue_delay_us: int) -> str:
    def tensor(entry, extra=""):
        n, t, dims = entry
        return f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, dims))} ]{extra}\n  }}'

    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(tensor(i) for i in inputs), "]",
             "output [", ",\n".join(tensor(o, '\n    label_filename: "labels.txt"') for o in outputs), "]",
             "dynamic_batching {",
             f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]",
             f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
             "instance_group [", f"  {{\n    count: {instances}\n    kind: {kind}\n  }}", "]"]
    return "\n".join(lines) + "\n"


def package_triton(model_path, repo, name: str | None = None, max_batch_size: int = 256, instances: int = 1,
                   kind: str = "KIND_GPU", max_queue_delay_us: int = 100, version: int = 1) -> pathlib.Path:
    """Write the model repository entry; returns the model's folder (``repo/name``)."""
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
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-', '.' (it becomes a folder and the "
                         "model's name in Triton)")
    if max_batch_size < 1 or instances < 1 or version < 1:
        raise ValueError("--max-batch-size, --instances and --version must be >= 1")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise ValueError(f"--kind must be KIND_GPU or KIND_CPU, got {kind!r}")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [_io(v, "input") for v in proto.graph.input if v.name not in initializers]
    outputs = [_io(v, "output") for v in proto.graph.output]
    preferred = sorted({b for b in (8, 32, 128, max_batch_size) if b <= max_batch_size})
    folder = pathlib.Path(repo) / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    for target, write in ((folder / str(version) / "model.onnx", lambda p: shutil.copyfile(model_path, p)),
                          (folder / "labels.txt", lambda p: p.write_text("\n".join(info.class_names) + "\n")),
                          (folder / "config.pbtxt", lambda p: p.write_text(render_config(
                              name, inputs, outputs, max_batch_size, instances, kind, preferred, max_queue_delay_us)))):
        atomic_write(target, write)
    return folder
