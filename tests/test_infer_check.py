"""The inference-request checks of the HTTP front (export/infer_check.py), without a server: what passes
is a request whose every declared tensor is backed by the bytes it brought.  Fast tier (hypothesis runs
a bounded number of examples; the fuzzers against the real server are tests/test_serve_attack.py)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subgrad.export.infer_check import DATATYPE_BYTES, BadRequest, ModelSpec, check_infer_request, parse_json

LENET = ModelSpec("lenet", 16, {"input": (3, 32, 32), "image_bytes": (1,)})
VARIABLE = ModelSpec("var", 0, {"tokens": (-1,), "flag": ()})


def _tensor(name="input", shape=(1, 3, 32, 32), datatype="FP32", **fields):
    return {"name": name, "shape": list(shape), "datatype": datatype, **fields}


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


VALID = [  # (spec, header, binary)
    (LENET, {"inputs": [_tensor(data=[0.5] * 3072)]}, b""),
    (LENET, {"inputs": [_tensor(shape=(2, 3, 32, 32), parameters={"binary_data_size": 24576})]}, bytes(24576)),
    (LENET, {"inputs": [_tensor(shape=(16, 3, 32, 32), parameters={"binary_data_size": 16 * 12288})]}, bytes(196608)),
    (LENET, {"inputs": [_tensor(shape=(0, 3, 32, 32), data=[])]}, b""),
    (
        LENET,
        {"inputs": [_tensor("image_bytes", (2, 1), "BYTES", parameters={"binary_data_size": 4 + 3 + 4})]},
        _bytes_tensor([b"abc", b""]),
    ),
    (LENET, {"inputs": [_tensor("image_bytes", (1, 1), "BYTES", data=["a png"])]}, b""),
    (LENET, {"inputs": [_tensor("input", (1, 3, 32, 32), "INT32", data=[[[[1] * 32] * 32] * 3])]}, b""),
    (
        LENET,
        {
            "id": "r1",
            "parameters": {"binary_data_output": True, "priority": 1, "sequence_id": "s"},
            "inputs": [_tensor(data=[0] * 3072)],
            "outputs": [{"name": "logits", "parameters": {"classification": 3, "binary_data": False}}],
        },
        b"",
    ),
    (VARIABLE, {"inputs": [_tensor("tokens", (7,), "INT64", data=list(range(7)))]}, b""),
    (VARIABLE, {"inputs": [_tensor("flag", (), "BOOL", data=[True])]}, b""),
]


@pytest.mark.parametrize("spec, header, binary", VALID, ids=range(len(VALID)))
def test_requests_backed_by_their_data_pass(spec, header, binary):
    check_infer_request(header, binary, spec)


BAD = {  # case -> (header, binary, part of the message)
    "huge batch, tiny data": ({"inputs": [_tensor(shape=(10**8, 3, 32, 32), data=[0.0])]}, b"", "more than model"),
    "huge binary shape": (
        {"inputs": [_tensor(shape=(2**40, 3, 32, 32), parameters={"binary_data_size": 4})]},
        bytes(4),
        "more than model",
    ),
    "negative dim": ({"inputs": [_tensor(shape=(-1, 3, 32, 32), data=[0.0])]}, b"", "negative"),
    "float dim": ({"inputs": [_tensor(shape=(1.0, 3, 32, 32), data=[0.0])]}, b"", "array of integers"),
    "bool dim": ({"inputs": [_tensor(shape=(True, 3, 32, 32), data=[0.0])]}, b"", "array of integers"),
    "data shorter than shape": ({"inputs": [_tensor(data=[0.0] * 3071)]}, b"", "'data' has 3071"),
    "ragged nesting": ({"inputs": [_tensor(shape=(1, 3, 1, 1), data=[[[[1.0]], [[2.0]], [[3, 4]]]])]}, b"", "nested"),
    "nested deeper than the shape": (
        {"inputs": [_tensor(shape=(1, 1, 1, 1), data=[[[[[1.0]]]]])]},
        b"",
        "nested",
    ),
    "binary size not count x element": (
        {"inputs": [_tensor(parameters={"binary_data_size": 12287})]},
        bytes(12287),
        "does not match",
    ),
    "binary beyond the body": ({"inputs": [_tensor(parameters={"binary_data_size": 12288})]}, bytes(12), "within"),
    "binary left over": ({"inputs": [_tensor(data=[0] * 3072)]}, bytes(8), "binary data"),
    "BYTES that do not frame": (
        {"inputs": [_tensor("image_bytes", (1, 1), "BYTES", parameters={"binary_data_size": 6})]},
        struct.pack("<I", 9) + b"ab",
        "length",
    ),
    "BYTES count off": (
        {"inputs": [_tensor("image_bytes", (1, 1), "BYTES", parameters={"binary_data_size": 10})]},
        _bytes_tensor([b"a", b"b"]),
        "does not match",
    ),
    "unknown input": ({"inputs": [_tensor("pixels", data=[0] * 3072)]}, b"", "unexpected inference input 'pixels'"),
    "input twice": ({"inputs": [_tensor(data=[0] * 3072)] * 2}, b"", "twice"),
    "unknown datatype": ({"inputs": [_tensor(datatype="FP8", data=[0] * 3072)]}, b"", "'datatype'"),
    "string in FP32 data": ({"inputs": [_tensor(data=["1"] * 3072)]}, b"", "numbers"),
    "float in INT32 data": ({"inputs": [_tensor(datatype="INT32", data=[0.5] * 3072)]}, b"", "integers"),
    "UINT8 out of range": ({"inputs": [_tensor(datatype="UINT8", data=[256] * 3072)]}, b"", "integers in [0, 255]"),
    "FP16 out of range": ({"inputs": [_tensor(datatype="FP16", data=[1e6] * 3072)]}, b"", "range"),
    "number in BOOL data": ({"inputs": [_tensor(datatype="BOOL", data=[1] * 3072)]}, b"", "true or false"),
    "no data": ({"inputs": [_tensor()]}, b"", "no 'data'"),
    "data and binary": (
        {"inputs": [_tensor(data=[0] * 3072, parameters={"binary_data_size": 12288})]},
        bytes(12288),
        "both",
    ),
    "shared memory without the key": (
        {"inputs": [_tensor(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 12288})]},
        b"",
        "admin key",
    ),
    "shared-memory output": (
        {"inputs": [_tensor(data=[0] * 3072)], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]},
        b"",
        "admin key",
    ),
    "binary_data_output not a boolean": (
        {"parameters": {"binary_data_output": 0}, "inputs": [_tensor(data=[0] * 3072)]},
        b"",
        "boolean",
    ),
    "negative classification": (
        {"inputs": [_tensor(data=[0] * 3072)], "outputs": [{"name": "logits", "parameters": {"classification": -1}}]},
        b"",
        "non-negative",
    ),
    "object parameter": ({"parameters": {"x": {}}, "inputs": []}, b"", "string, number or boolean"),
    "unknown request field": ({"inputs": [], "extra": 1}, b"", "unknown field 'extra'"),
    "unknown input field": ({"inputs": [_tensor(data=[0] * 3072, contents=[])]}, b"", "unknown field 'contents'"),
    "inputs not an array": ({"inputs": {"name": "input"}}, b"", "JSON arrays"),
    "id not a string": ({"id": 7, "inputs": []}, b"", "'id'"),
    "request not an object": ([], b"", "JSON object"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_requests_not_backed_by_their_data_are_refused_with_the_reason(case):
    header, binary, message = BAD[case]
    with pytest.raises(BadRequest) as caught:
        check_infer_request(header, binary, LENET)
    assert message in str(caught.value), (case, str(caught.value))


def test_shared_memory_passes_with_the_admin_key():
    header = {"inputs": [_tensor(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 12288})]}
    check_infer_request(header, b"", LENET, admin=True)


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"a": 1, "a": 2}', "repeated key"),
        (b'{"inputs": [NaN]}', "NaN"),
        (b'{"inputs": [Infinity]}', "Infinity"),
        (b'{"inputs": [\xff]}', "not JSON"),
        ('{"a": 1}'.encode("utf-16"), "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'{"x": 1' + b"0" * 5000 + b"}", "not JSON"),
        (b"", "not JSON"),
    ],
)
def test_parse_json_is_strict(text, message):
    with pytest.raises(BadRequest, match=message):
        parse_json(text)


def test_model_spec_from_tritons_config_json():
    config = {"name": "lenet", "max_batch_size": 16, "input": [{"name": "input", "dims": ["3", "32", "32"]}]}
    assert ModelSpec.from_config(config) == ModelSpec("lenet", 16, {"input": (3, 32, 32)})
    assert ModelSpec.from_config(config).max_elements("input") == 16 * 3072
    assert VARIABLE.max_elements("tokens") is None and VARIABLE.max_elements("flag") == 1


def _leaves(data) -> int:
    return sum(_leaves(item) for item in data) if isinstance(data, list) else 1


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
REQUEST_KEYS = st.sampled_from(["inputs", "outputs", "parameters", "id", "name", "shape", "datatype", "data"])


@st.composite
def request_like(draw):
    """Requests that look like inference requests: the right keys holding anything."""
    values = JSON_VALUES | st.lists(st.integers(-(2**70), 2**70), max_size=5)
    tensor = st.dictionaries(REQUEST_KEYS, values, max_size=5)
    inputs = st.lists(tensor | st.builds(_tensor, data=st.lists(st.floats(allow_nan=False), max_size=3)), max_size=3)
    return draw(st.fixed_dictionaries({"inputs": inputs}, optional={"outputs": st.lists(tensor), "id": JSON_VALUES}))


@settings(max_examples=300, deadline=None)
@given(header=request_like() | JSON_VALUES, binary=st.binary(max_size=64))
def test_any_request_is_passed_or_refused_with_badrequest_and_what_passes_is_backed(header, binary):
    try:
        check_infer_request(header, binary, LENET)
    except BadRequest:
        return
    total = 0
    for entry in header["inputs"]:
        count = math.prod(entry["shape"])
        assert count <= LENET.max_elements(entry["name"])
        size = entry.get("parameters", {}).get("binary_data_size")
        if size is None:
            assert count == _leaves(entry["data"]), entry
        else:
            assert DATATYPE_BYTES[entry["datatype"]] == 0 or size == count * DATATYPE_BYTES[entry["datatype"]]
            total += size
    assert total == len(binary)
