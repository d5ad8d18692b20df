"""Checks of a KServe v2 inference request against the served model, before Triton reads it.

    spec = ModelSpec.from_config(config)               # Triton's /v2/models/<m>/config, read at start
    check_infer_request(header, binary, spec)          # raises BadRequest(message) or returns

Triton 2.51's HTTP frontend allocates what a request's ``shape`` declares before it compares the shape
with the data sent, so a few hundred bytes declaring a shape of 10^8 x 3 x 32 x 32 end the server
(``std::bad_alloc``, signal 6), and a data array that disagrees with its shape, or a negative dim, gets
a 500.  What passes here is a request whose every declared tensor is backed by the bytes it brought:

* the request is a JSON object with only the protocol's fields (``id``, ``parameters``, ``inputs``,
  ``outputs``); no key appears twice in an object (Triton's parser might read the other one); no
  ``NaN`` or ``Infinity``;
* every input names an input of the model, once, with a known ``datatype`` and a ``shape`` of
  non-negative integers whose element count is at most ``max_batch_size`` times the model's fixed dims
  (a variable dim is bounded by the data below);
* the element count agrees with the input's data: the leaves of its JSON ``data`` (flat, or nested
  exactly as the shape), each of the datatype's JSON type and range; or its ``binary_data_size``
  (count times the datatype's size; for BYTES, exactly ``count`` length-prefixed elements);
* shared-memory inputs and outputs only with the admin key (registering a region needs it too).

Whether the datatype and dims are the model's is left to Triton, which answers those with 400 and
its own message.  Pure functions over parsed values: tests/test_infer_check.py runs them without a
server, tests/test_serve.py fuzzes them with the real one.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

#: KServe v2 datatypes: bytes per element (BYTES: a 4-byte length, then the element's bytes).
DATATYPE_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "UINT32": 4,
    "INT32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": 0,
}
_INTEGER_RANGES = {
    name: (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if name[0] == "I" else (0, (1 << (8 * size)) - 1)
    for name, size in DATATYPE_BYTES.items()
    if name.startswith(("INT", "UINT"))
}
_FLOAT_MAX = {"FP16": 65504.0, "BF16": 3.3895313892515355e38, "FP32": 3.4028234663852886e38, "FP64": math.inf}
_REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}
_INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_FIELDS = {"name", "parameters"}
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_UNSIGNED = "a non-negative integer"
#: Parameters Triton reads itself, and the JSON type it reads each as (it answers 500 to another type).
_RESERVED = {
    "request": {
        "binary_data_output": "a boolean",
        "priority": _UNSIGNED,
        "timeout": _UNSIGNED,
        "sequence_id": "a non-negative integer or a string",
        "sequence_start": "a boolean",
        "sequence_end": "a boolean",
    },
    "input": {"binary_data_size": _UNSIGNED},
    "output": {"binary_data": "a boolean", "classification": _UNSIGNED},
}
_KINDS = {
    "a boolean": lambda v: isinstance(v, bool),
    _UNSIGNED: lambda v: _is_int(v) and 0 <= v < 1 << 64,
    "a non-negative integer or a string": lambda v: isinstance(v, str) or (_is_int(v) and 0 <= v < 1 << 64),
}


class BadRequest(ValueError):
    """A request the server must not read; the message says what is wrong with it."""


@dataclass(frozen=True)
class ModelSpec:
    """What the checks need of a served model: its inputs' fixed dims and its max_batch_size."""

    name: str
    max_batch_size: int  # 0: the model takes no batch dimension
    inputs: dict[str, tuple[int, ...]]  # input name -> dims without the batch dim (-1: variable)

    @classmethod
    def from_config(cls, config: dict) -> "ModelSpec":
        """From Triton's model configuration as JSON (``GET /v2/models/<model>/config``)."""
        inputs = {i["name"]: tuple(int(d) for d in i.get("dims", [])) for i in config.get("input", [])}
        return cls(config["name"], int(config.get("max_batch_size", 0)), inputs)

    def max_elements(self, name: str) -> int | None:
        """Most elements an input can hold; None when a variable dim leaves it to the data."""
        dims = self.inputs[name]
        if any(d < 0 for d in dims):
            return None
        return max(self.max_batch_size, 1) * math.prod(dims)


def parse_json(data: bytes) -> object:
    """Strict JSON: UTF-8, no duplicate keys, no NaN / Infinity (BadRequest otherwise)."""

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise BadRequest(f"JSON object with a repeated key ({sorted(k for k in keys if keys.count(k) > 1)[0]!r})")
        return dict(pairs)

    def no_constant(name):
        raise BadRequest(f"JSON has {name}, which is not JSON; send finite numbers")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except BadRequest:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"the inference header is not JSON ({type(exc).__name__})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar_parameters(parameters, where: str, level: str) -> dict:
    """``parameters`` of the request, an input or an output (``level``): scalars, Triton's own of their type."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: 'parameters' must be a JSON object")
    for key, value in parameters.items():
        if not isinstance(value, (str, int, float, bool)):
            raise BadRequest(f"{where}: parameter {key!r} must be a string, number or boolean")
        kind = _RESERVED[level].get(key)
        if kind is not None and not _KINDS[kind](value):
            raise BadRequest(f"{where}: parameter {key!r} must be {kind}")
    return parameters


def _leaves(data, shape: list[int], where: str) -> list:
    """The elements of a JSON ``data`` array: flat, or nested exactly as ``shape``."""
    if not isinstance(data, list):
        raise BadRequest(f"{where}: 'data' must be a JSON array")
    if not any(isinstance(item, list) for item in data):
        return data
    out = []

    def walk(node, depth):
        if depth == len(shape):
            if isinstance(node, list):
                raise BadRequest(f"{where}: 'data' is nested deeper than its shape {shape}")
            out.append(node)
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise BadRequest(f"{where}: 'data' is not nested as its shape {shape} (dim {depth})")
        for item in node:
            walk(item, depth + 1)

    walk(data, 0)
    return out


def _check_values(values: list, datatype: str, where: str) -> None:
    if datatype == "BYTES":
        ok = all(isinstance(v, str) for v in values)
        kind = "strings"
    elif datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in values)
        kind = "true or false"
    elif datatype in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[datatype]
        ok = all(_is_int(v) and low <= v <= high for v in values)
        kind = f"integers in [{low}, {high}]"
    else:
        limit = _FLOAT_MAX[datatype]
        ok = all((_is_int(v) or isinstance(v, float)) and abs(v) <= limit for v in values)
        kind = f"numbers within {datatype}'s range"
    if not ok:
        raise BadRequest(f"{where}: {datatype} 'data' must hold {kind}")


def _bytes_elements(segment: bytes) -> int:
    """Number of length-prefixed elements a BYTES tensor's binary data holds (-1 when it does not frame)."""
    count, offset = 0, 0
    while offset < len(segment):
        if offset + 4 > len(segment):
            return -1
        (length,) = struct.unpack_from("<I", segment, offset)
        offset += 4 + length
        count += 1
    return count if offset == len(segment) else -1


def _check_input(entry, spec: ModelSpec, binary: memoryview, offset: int, admin: bool) -> int:
    """Check one input; the offset of the next input's binary data."""
    if not isinstance(entry, dict):
        raise BadRequest("every entry of 'inputs' must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise BadRequest("every input needs a 'name' string")
    where = f"input {name!r}"
    if set(entry) - _INPUT_FIELDS:
        raise BadRequest(f"{where}: unknown field {sorted(set(entry) - _INPUT_FIELDS)[0]!r}")
    if name not in spec.inputs:
        raise BadRequest(f"unexpected inference input {name!r} for model {spec.name!r}; it has {sorted(spec.inputs)}")
    datatype, shape = entry.get("datatype"), entry.get("shape")
    if datatype not in DATATYPE_BYTES:
        raise BadRequest(f"{where}: 'datatype' must be one of {', '.join(DATATYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise BadRequest(f"{where}: 'shape' must be an array of integers")
    if any(d < 0 for d in shape):
        raise BadRequest(f"{where}: shape {shape} has a negative dim")
    count = math.prod(shape)
    bound = spec.max_elements(name)
    if bound is not None and count > bound:
        raise BadRequest(
            f"{where}: shape {shape} holds {count} elements, more than model {spec.name!r} takes "
            f"(max_batch_size {spec.max_batch_size} x {list(spec.inputs[name])})"
        )
    parameters = _scalar_parameters(entry.get("parameters"), where, "input")
    if any(key in parameters for key in _SHARED_MEMORY):
        if not admin:
            raise BadRequest(f"{where}: shared-memory inputs need the admin key")
        return offset
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise BadRequest(f"{where}: has both 'data' and 'binary_data_size'")
        if offset + size > len(binary):
            raise BadRequest(f"{where}: binary_data_size {size!r} is not within the request's binary data")
        element = DATATYPE_BYTES[datatype]
        if element:
            agrees = size == count * element
        else:
            agrees = _bytes_elements(binary[offset : offset + size]) == count
        if not agrees:
            raise BadRequest(
                f"{where}: shape {shape} of {datatype} does not match its {size} bytes of binary data"
                + ("" if element else " (4-byte little-endian length, then the bytes, per element)")
            )
        return offset + size
    if "data" not in entry:
        raise BadRequest(f"{where}: no 'data' and no 'binary_data_size'")
    values = _leaves(entry["data"], shape, where)
    if len(values) != count:
        raise BadRequest(f"{where}: shape {shape} holds {count} elements but 'data' has {len(values)}")
    _check_values(values, datatype, where)
    return offset


def check_infer_request(header, binary: bytes, spec: ModelSpec, admin: bool = False) -> None:
    """Check a parsed inference header and the binary data after it (``b""`` for a JSON-only body)
    against ``spec``; raise :class:`BadRequest` with the reason, or return."""
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    if set(header) - _REQUEST_FIELDS:
        raise BadRequest(f"unknown field {sorted(set(header) - _REQUEST_FIELDS)[0]!r} in the inference request")
    if "id" in header and not isinstance(header["id"], str):
        raise BadRequest("'id' must be a string")
    _scalar_parameters(header.get("parameters"), "the request", "request")
    inputs, outputs = header.get("inputs"), header.get("outputs", [])
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise BadRequest("'inputs' (and 'outputs', when given) must be JSON arrays")
    names = [entry["name"] for entry in inputs if isinstance(entry, dict) and isinstance(entry.get("name"), str)]
    if len(set(names)) != len(names):
        raise BadRequest("an input appears twice in the request")
    binary, offset = memoryview(binary), 0
    for entry in inputs:
        offset = _check_input(entry, spec, binary, offset, admin)
    if offset != len(binary):
        raise BadRequest(
            f"the request carries {len(binary)} bytes of binary data but its inputs declare {offset} (binary_data_size)"
        )
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("every entry of 'outputs' must be a JSON object with a 'name' string")
        if set(entry) - _OUTPUT_FIELDS:
            raise BadRequest(f"output {entry['name']!r}: unknown field {sorted(set(entry) - _OUTPUT_FIELDS)[0]!r}")
        parameters = _scalar_parameters(entry.get("parameters"), f"output {entry['name']!r}", "output")
        if any(key in parameters for key in _SHARED_MEMORY) and not admin:
            raise BadRequest(f"output {entry['name']!r}: shared-memory outputs need the admin key")
