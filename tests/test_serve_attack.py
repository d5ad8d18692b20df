"""`subgrad serve` under attack: a real Triton Inference Server (the serve extra's), real clients.

* Property-based fuzzers (hypothesis) send KServe v2 inference requests over HTTP (raw bytes through the
  front: JSON and binary bodies, names, dtypes, shapes zero / negative / huge / mismatched with their
  data, parameters, binary sizes and header lengths that lie) and over gRPC (raw ModelInferRequest
  messages: the same, plus raw contents of lying sizes).  Every answer must be a client error (HTTP
  4xx with Triton's ``{"error": ...}``; gRPC INVALID_ARGUMENT or NOT_FOUND) or a correct result (an FP32
  ``input`` answered bit for bit as Predictor answers it); afterwards the tritonserver process and its
  stubs are the ones from before and a valid request is answered bit for bit.  Examples per protocol:
  ``SUBGRAD_FUZZ_EXAMPLES`` (default 600), seed ``SUBGRAD_FUZZ_SEED`` (default 0: CI runs the same
  requests every time; set another to explore).
* The admin API (model repository, shared memory, trace, logging) is refused on both ports without
  the key and answered with it; an uploaded model's code never runs; the ports listen on loopback.
* `subgrad serve` starts a killed server again and exits 1 past its restart bound.

Slow tier (conftest: each file declares its tier).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import time
import zlib

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from subgrad.export.http_framing import ADMIN_HEADER
from subgrad.export.infer_check import DATATYPE_BYTES
from subgrad.export.runtime import Predictor
from subgrad.export.serve import GRPC_ADMIN_HEADER, TritonServer, free_port
from subgrad.export.triton_repo import package_triton
from test_serve import _serve, _wait_for_line

pytestmark = pytest.mark.slow  # a real Triton Inference Server

MODEL = "lenet"
MAX_BATCH = 16
ADMIN_KEY = "attack-test-admin-key-0123456789"
EXAMPLES = int(os.environ.get("SUBGRAD_FUZZ_EXAMPLES", "600"))
FUZZ_SEED = int(os.environ.get("SUBGRAD_FUZZ_SEED", "0"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
#: What Triton's gRPC endpoint answers a request it will not run.
GRPC_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def server(served_lenet_onnx, tmp_path_factory):
    repo = tmp_path_factory.mktemp("attack-repo")
    package_triton(served_lenet_onnx, repo, name=MODEL, backend="python", max_batch_size=MAX_BATCH)
    triton = TritonServer(
        repo, free_port(), free_port(), free_port(), log_path=repo.parent / "attack.log", admin_key=ADMIN_KEY
    )
    with triton:
        yield triton


@pytest.fixture(scope="module")
def predictor(served_lenet_onnx):
    return Predictor(served_lenet_onnx)


def _raw_http(port: int, data: bytes, timeout_s: float = 60.0) -> tuple[int, bytes]:
    """Send raw bytes, read until the server closes; (status, body).  Status 0: closed with no answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the body was read: the answer is still there to read
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


def _expected_logits(predictor, array: np.ndarray) -> np.ndarray:
    return predictor.session.run(None, {"input": array})[0]


def _assert_still_serving(server, predictor, pid, stubs):
    assert server.exit_status() is None, f"the server exited; its log: {server.log_path}"
    assert server.process.pid == pid, "the tritonserver process was replaced"
    assert set(server._stub_pids()) == set(stubs), "a python-backend stub died or was replaced"
    feed = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for client, module in (
        (httpclient.InferenceServerClient(f"localhost:{server.http_port}"), httpclient),
        (grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}"), grpcclient),
    ):
        item = module.InferInput("input", list(feed.shape), "FP32")
        item.set_data_from_numpy(feed)
        out = client.infer(MODEL, [item]).as_numpy("logits")
        assert np.array_equal(out, _expected_logits(predictor, feed)), f"{module.__name__}: wrong logits after fuzzing"


# -- what the fuzzers generate ----------------------------------------------------------------------------

NAMES = st.sampled_from(["input", "input", "input", "image_bytes", "logits", "", "INPUT", "x" * 300]) | st.text(
    max_size=6
)
DATATYPES = st.sampled_from(["FP32", "FP32", "FP32", "BYTES", *DATATYPE_BYTES, "fp32", "FP8", "STRING", ""])
HUGE = [2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 10**12]
DIM = st.integers(0, 4) | st.sampled_from([3, 32, 17, *HUGE]) | st.integers(-3, -1)


def _png(rng, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3))).save(buffer, "PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def bomb_png(width: int = 12000, height: int = 12000) -> bytes:
    """A grayscale PNG of ``width`` x ``height`` black pixels: a few hundred KB that decode to width x height
    bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compress, row, pixels = zlib.compressobj(9), bytes(width + 1), []
    pixels = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@st.composite
def tensors(draw, valid: bool):
    """(name, datatype, shape, numpy values): an input the model takes when ``valid``, else anything."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if valid:
        batch = draw(st.integers(1, MAX_BATCH))
        if draw(st.integers(0, 3)):
            return "input", "FP32", [batch, 3, 32, 32], rng.standard_normal(batch * 3072)
        sizes = draw(st.lists(st.sampled_from([(1, 1), (32, 32), (500, 300), "bomb"]), min_size=batch, max_size=batch))
        files = [bomb_png() if size == "bomb" else _png(rng, *size) for size in sizes]
        return "image_bytes", "BYTES", [batch, 1], np.array(files, dtype=object)
    name, datatype = draw(NAMES), draw(DATATYPES)
    if draw(st.booleans()):
        batch = draw(st.integers(0, MAX_BATCH + 1))
        shape = [batch, 1] if name == "image_bytes" else [batch, 3, 32, 32]
    else:
        shape = draw(st.lists(DIM, max_size=5))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if draw(st.integers(0, 3)) == 0 or not 0 <= count <= 60000:
        count = draw(st.integers(0, 40))  # data of another size than the shape's
    scale = draw(st.sampled_from([1.0, 1e3, 1e30, 1e39]))
    if datatype == "BYTES":
        values = np.array([rng.bytes(int(rng.integers(0, 40))) for _ in range(count)], dtype=object)
    elif datatype in ("FP32", "FP16", "BF16", "FP64", "fp32"):
        values = (rng.standard_normal(count) * scale).astype(np.float64)
    elif datatype == "BOOL":
        values = rng.integers(0, 2, count).astype(bool)
    else:
        values = rng.integers(-(2**40), 2**40, count) if scale > 1 else rng.integers(0, 200, count)
    return name, datatype, shape, values


def _json_values(values):
    if values.dtype == object:
        return [v.decode("latin-1") for v in values]
    return values.tolist()


def _binary_values(datatype, values) -> bytes:
    if values.dtype == object:
        return b"".join(len(v).to_bytes(4, "little") + v for v in values)
    numpy_type = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "BOOL": np.bool_}.get(datatype)
    if numpy_type is None:
        size = DATATYPE_BYTES.get(datatype) or 4
        numpy_type = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[size]
    with np.errstate(all="ignore"):
        return values.astype(numpy_type).tobytes()


def _checkable(name, datatype, shape, values):
    """The FP32 batch a valid tensor input carries (its answer is checked against Predictor), else None."""
    if name == "input" and datatype == "FP32" and len(shape) == 4 and values.size == math.prod(shape):
        with np.errstate(all="ignore"):
            return values.astype(np.float32).reshape(shape)
    return None


PARAMETER_VALUES = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**64), st.text(max_size=10), st.floats(), st.none(), st.lists(st.integers())
)
PARAMETERS = st.dictionaries(
    st.sampled_from(
        ["binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "classification"]
        + ["shared_memory_region", "shared_memory_byte_size", "binary_data_size", "headers", "x"]
    ),
    PARAMETER_VALUES,
    max_size=3,
)
#: The faults a request may carry (none: a valid request, half of them).
HTTP_FAULTS = ["tensor", "inputs", "outputs", "parameters", "field", "binary size", "header length", "length", "path"]
HTTP_FAULTS += ["junk", "nested"]
GRPC_FAULTS = ["tensor", "inputs", "outputs", "parameters", "version", "model", "raw size", "raw count"]


def _faults(draw, names):
    return set() if draw(st.booleans()) else set(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)))


@st.composite
def http_requests(draw):
    """Raw bytes of one HTTP inference request; the FP32 batch it carries when its answer is checkable."""
    faults = _faults(draw, HTTP_FAULTS)
    inputs, binary, checkable = [], b"", None
    for _ in range(draw(st.sampled_from([0, 2])) if "inputs" in faults else 1):
        name, datatype, shape, values = draw(tensors(valid="tensor" not in faults))
        entry = {"name": name, "shape": shape, "datatype": datatype}
        encoding = draw(st.sampled_from(["json", "binary", "binary", "binary"] + ["none"] * ("tensor" in faults)))
        if encoding == "json" and values.size > 2000 and draw(st.booleans()):
            encoding = "binary"  # most large JSON bodies are over the front's limit: keep some that are not
        if encoding == "json":
            entry["data"] = _json_values(values)
            if "nested" in faults and values.size:  # nest it (rightly or not)
                entry["data"] = [entry["data"][: values.size // 2], entry["data"][values.size // 2 :]]
        elif encoding == "binary":
            data = _binary_values(datatype, values)
            lie = draw(st.sampled_from([-1, 1, 4, 2**40, -len(data)])) if "binary size" in faults else 0
            entry["parameters"] = {"binary_data_size": len(data) + lie}
            binary += data
        if "parameters" in faults and draw(st.booleans()):
            entry["parameters"] = {**entry.get("parameters", {}), **draw(PARAMETERS)}
        inputs.append(entry)
        checkable = _checkable(name, datatype, shape, values)
    request = {"inputs": inputs}
    if "outputs" in faults or draw(st.integers(0, 3)) == 0:
        parameters = draw(PARAMETERS) if "outputs" in faults else {"classification": draw(st.integers(1, 10))}
        request["outputs"] = [{"name": draw(st.sampled_from(["logits", "logits", "x"])), "parameters": parameters}]
        checkable = None
    if "parameters" in faults:
        request["parameters"] = draw(PARAMETERS)
        checkable = None
    if "field" in faults:
        request[draw(st.sampled_from(["id", "extra", "inputs", "outputs"]))] = draw(PARAMETER_VALUES)
    header = json.dumps(request).encode()
    body = header + binary
    if "junk" in faults:
        body = draw(st.binary(max_size=300))  # junk in place of the request
    headers = [b"Host: fuzz", b"Connection: close"]
    if binary or "header length" in faults:
        lie = draw(st.sampled_from([-1, 1, -len(header), 10**6, 10**20])) if "header length" in faults else 0
        headers.append(b"Inference-Header-Content-Length: %d" % (len(header) + lie))
    short = draw(st.sampled_from([1, 7, len(body)])) if "length" in faults else 0  # a Content-Length that lies short
    headers.append(b"Content-Length: %d" % max(len(body) - short, 0))
    path = f"/v2/models/{MODEL}/" + draw(st.sampled_from(["infer", "versions/1/infer"]))
    if "path" in faults:
        path = draw(
            st.sampled_from([f"/v2/models/{MODEL}/versions/2/infer", "/v2/models/nope/infer", "/v2/models//infer"])
        )
    raw = f"POST {path} HTTP/1.1\r\n".encode() + b"\r\n".join(headers) + b"\r\n\r\n" + body
    return raw, (checkable if not faults else None)


@st.composite
def grpc_requests(draw):
    """One raw ModelInferRequest; the FP32 batch it carries when its answer is checkable."""
    faults = _faults(draw, GRPC_FAULTS)
    request = service_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from(["nope", "", "LENET"])) if "model" in faults else MODEL,
        model_version=draw(st.sampled_from(["2", "x", "-1", "99999999999999999999"]))
        if "version" in faults
        else draw(st.sampled_from(["", "1"])),
    )
    checkable, raw_contents = None, []
    for _ in range(draw(st.sampled_from([0, 2])) if "inputs" in faults else 1):
        name, datatype, shape, values = draw(tensors(valid="tensor" not in faults))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        encoding = draw(st.sampled_from(["raw", "raw", "raw"] + ["contents", "none"] * ("tensor" in faults)))
        if encoding == "raw":
            data = _binary_values(datatype, values)
            if "raw size" in faults:
                data = data[: draw(st.integers(0, max(len(data) - 1, 0)))] + bytes(draw(st.sampled_from([0, 1, 4])))
            raw_contents.append(data)
        elif encoding == "contents":
            if values.dtype == object:
                tensor.contents.bytes_contents.extend(list(values))
            elif values.dtype == bool:
                tensor.contents.bool_contents.extend(values.tolist())
            elif np.issubdtype(values.dtype, np.integer):
                tensor.contents.int64_contents.extend(np.clip(values, -(2**63), 2**63 - 1).tolist())
            else:
                with np.errstate(all="ignore"):
                    tensor.contents.fp32_contents.extend(values.astype(np.float32).tolist())
        for key, value in draw(PARAMETERS).items() if "parameters" in faults else ():
            if isinstance(value, bool):
                tensor.parameters[key].bool_param = value
            elif isinstance(value, int) and -(2**63) <= value < 2**63:
                tensor.parameters[key].int64_param = value
            elif isinstance(value, str):
                tensor.parameters[key].string_param = value
        checkable = _checkable(name, datatype, shape, values)
    if "raw count" in faults:
        raw_contents.append(b"\0" * draw(st.integers(0, 16)))  # more raw contents than inputs
    request.raw_input_contents.extend(raw_contents)
    if "outputs" in faults or draw(st.integers(0, 3)) == 0:
        output = request.outputs.add(name=draw(st.sampled_from(["logits", "logits", "x"])))
        classes = draw(st.integers(-5, 2**40)) if "outputs" in faults else draw(st.integers(1, 10))
        output.parameters["classification"].int64_param = classes
        checkable = None
    return request, (checkable if not faults else None)


# -- the fuzzers ----------------------------------------------------------------------------------------


def test_http_fuzz_every_answer_is_a_client_error_or_right(server, predictor):
    pid, stubs, answers = server.process.pid, server._stub_pids(), {}

    @seed(FUZZ_SEED)
    @FUZZ
    @given(http_requests())
    def fuzz(case):
        raw, checkable = case
        status, body = _raw_http(server.http_port, raw)
        answers[status] = answers.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, f"status {status} ({body[:300]!r}) for {raw[:600]!r}"
        if status != 200:
            assert isinstance(json.loads(body)["error"], str), body[:300]
        elif checkable is not None:
            out = json.loads(body)["outputs"][0]
            served = np.array(out["data"], np.float32).reshape(out["shape"])
            assert np.array_equal(served, _expected_logits(predictor, checkable), equal_nan=True), raw[:600]

    fuzz()
    print(f"HTTP fuzz (seed {FUZZ_SEED}): answers by status {dict(sorted(answers.items()))}")
    assert sum(answers.values()) >= min(EXAMPLES, 500), answers
    _assert_still_serving(server, predictor, pid, stubs)


def test_grpc_fuzz_every_answer_is_a_client_error_or_right(server, predictor):
    pid, stubs, answers = server.process.pid, server._stub_pids(), {}
    channel = grpc.insecure_channel(f"localhost:{server.grpc_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    @seed(FUZZ_SEED)
    @FUZZ
    @given(grpc_requests())
    def fuzz(case):
        request, checkable = case
        try:
            response = stub.ModelInfer(request, timeout=60)
        except grpc.RpcError as exc:
            answers[exc.code().name] = answers.get(exc.code().name, 0) + 1
            assert exc.code() in GRPC_CLIENT_ERRORS, f"{exc.code()} ({exc.details()}) for {request}"[:1500]
            return
        answers["OK"] = answers.get("OK", 0) + 1
        if checkable is not None:
            served = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(response.outputs[0].shape)
            assert np.array_equal(served, _expected_logits(predictor, checkable), equal_nan=True), str(request)[:600]

    fuzz()
    channel.close()
    print(f"gRPC fuzz (seed {FUZZ_SEED}): answers by status {dict(sorted(answers.items()))}")
    assert sum(answers.values()) >= min(EXAMPLES, 500), answers
    _assert_still_serving(server, predictor, pid, stubs)


# -- the admin surface ----------------------------------------------------------------------------------

ADMIN_HTTP = [  # (method, path, body): one call of each restricted group
    ("POST", "/v2/repository/index", b"{}"),
    ("GET", "/v2/systemsharedmemory/status", b""),
    ("GET", "/v2/cudasharedmemory/status", b""),
    ("GET", "/v2/trace/setting", b""),
    ("GET", f"/v2/models/{MODEL}/trace/setting", b""),
    ("GET", "/v2/logging", b""),
    ("POST", f"/v2/repository/models/{MODEL}/unload", b"{}"),
]


def _http_call(server, method, path, body, key=None):
    headers = f"Host: t\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    if key:
        headers += f"{ADMIN_HEADER}: {key}\r\n"
    return _raw_http(server.http_port, f"{method} {path} HTTP/1.1\r\n{headers}\r\n".encode() + body)


@pytest.mark.parametrize("method, path, body", ADMIN_HTTP, ids=[p for _, p, _ in ADMIN_HTTP])
def test_http_admin_calls_are_refused_without_the_key(server, method, path, body):
    for key in (None, "wrong-key-0123456789abcdef"):
        status, answer = _http_call(server, method, path, body, key)
        assert status == 403 and ADMIN_HEADER in json.loads(answer)["error"], (key, status, answer)
    assert server.guard is not None and _http_call(server, "GET", f"/v2/models/{MODEL}/ready", b"")[0] == 200


def test_grpc_admin_calls_are_refused_without_the_key(server):
    client = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")
    calls = {
        "index": lambda h: client.get_model_repository_index(headers=h),
        "unload": lambda h: client.unload_model(MODEL, headers=h),
        "load": lambda h: client.load_model(MODEL, headers=h),
        "shared memory": lambda h: client.get_system_shared_memory_status(headers=h),
        "cuda shared memory": lambda h: client.get_cuda_shared_memory_status(headers=h),
        "trace": lambda h: client.get_trace_settings(headers=h),
        "logging": lambda h: client.update_log_settings({"log_verbose_level": 1}, headers=h),
    }
    for what, call in calls.items():
        for headers in (None, {ADMIN_HEADER: ADMIN_KEY}, {GRPC_ADMIN_HEADER: "wrong-key-0123456789abcdef"}):
            with pytest.raises(InferenceServerException) as caught:
                call(headers)
            assert caught.value.status() == "StatusCode.UNAVAILABLE", (what, headers, caught.value)
            assert "restricted" in str(caught.value), (what, caught.value)
    assert client.is_model_ready(MODEL)


def test_admin_calls_are_answered_with_the_key(server, predictor):
    """With the key, over both protocols: unload the model, load it back, read the admin settings."""
    status, answer = _http_call(server, "POST", "/v2/repository/index", b"{}", ADMIN_KEY)
    assert status == 200 and json.loads(answer)[0]["name"] == MODEL, (status, answer)
    for method, path, body in ADMIN_HTTP[1:-1]:
        assert _http_call(server, method, path, body, ADMIN_KEY)[0] in (200, 400), path  # 400: no CUDA here
    assert _http_call(server, "POST", f"/v2/repository/models/{MODEL}/unload", b"{}", ADMIN_KEY)[0] == 200
    client = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")
    key = {GRPC_ADMIN_HEADER: ADMIN_KEY}
    deadline = time.monotonic() + 60
    while client.is_model_ready(MODEL) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not client.is_model_ready(MODEL)
    client.load_model(MODEL, headers=key)
    assert client.is_model_ready(MODEL)
    assert client.get_model_repository_index(headers=key, as_json=True)["models"][0]["name"] == MODEL
    assert "log_verbose_level" in client.get_log_settings(headers=key, as_json=True)["settings"]
    server._stubs = server._stub_pids()  # the reload started new stubs
    feed = np.zeros((1, 3, 32, 32), np.float32)
    item = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
    item.set_data_from_numpy(feed)
    assert np.array_equal(client.infer(MODEL, [item]).as_numpy("logits"), _expected_logits(predictor, feed))


def _uploaded_model(marker: pathlib.Path) -> tuple[str, dict[str, str]]:
    """Triton's repository-extension load of a new model from uploaded files whose code writes ``marker``."""
    config = '{"backend": "python", "max_batch_size": 0, "input": [], "output": []}'
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass TritonPythonModel:\n    pass\n"
    return config, {"file:1/model.py": base64.b64encode(code.encode()).decode()}


def test_an_uploaded_model_is_refused_and_its_code_never_runs(server, tmp_path):
    marker = tmp_path / "marker"
    config, files = _uploaded_model(marker)
    body = json.dumps({"parameters": {"config": config, **files}}).encode()
    status, answer = _http_call(server, "POST", "/v2/repository/models/evil/load", body)
    assert status == 403, (status, answer)
    for path in ("//v2/repository/models/evil/load", "/v2/%72epository/models/evil/load", "/v2/repository/../x"):
        assert _http_call(server, "POST", path, body)[0] in (403, 404), path
    client = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}")
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("evil", config=config, files={k: base64.b64decode(v) for k, v in files.items()})
    assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value
    time.sleep(2)
    assert not marker.exists(), "the uploaded model's code ran"
    assert _http_call(server, "GET", "/v2/models/evil/ready", b"")[0] != 200


def _listening(port: int) -> list[str]:
    """Addresses a TCP socket listens on at ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per-word host order
                found.append(socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6, words))
    return found


def test_every_port_listens_on_loopback_by_default(server):
    for what, port in (("HTTP", server.http_port), ("gRPC", server.grpc_port), ("metrics", server.metrics_port)):
        addresses = _listening(port)
        assert addresses, f"nothing listens on the {what} port {port}"
        assert all(a in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for a in addresses), (what, addresses)


# -- a server that dies ---------------------------------------------------------------------------------


def _tritonserver_child(pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "tritonserver"], capture_output=True, text=True).stdout
    assert out.split(), "subgrad serve has no tritonserver child"
    return int(out.split()[0])


def test_serve_restarts_a_dead_server_and_exits_1_past_its_bound(served_lenet_onnx, predictor):
    http_port, grpc_port = free_port(), free_port()
    proc = _serve(
        served_lenet_onnx, "--http-port", http_port, "--grpc-port", grpc_port, "--metrics-port", free_port(),
        "--restarts", 1,
    )  # fmt: skip
    try:
        _wait_for_line(proc.stdout, "Ctrl-C")
        feed = np.ones((1, 3, 32, 32), np.float32)
        expected = _expected_logits(predictor, feed)
        for crash in range(2):
            os.kill(_tritonserver_child(proc.pid), signal.SIGKILL)
            if crash == 1:
                break
            _wait_for_line(proc.stderr, "restarting")
            _wait_for_line(proc.stderr, "serving again")
            for module, port in ((httpclient, http_port), (grpcclient, grpc_port)):
                item = module.InferInput("input", [1, 3, 32, 32], "FP32")
                item.set_data_from_numpy(feed)
                served = module.InferenceServerClient(f"localhost:{port}").infer(MODEL, [item]).as_numpy("logits")
                assert np.array_equal(served, expected), f"{module.__name__} after the restart"
        _wait_for_line(proc.stderr, "giving up")
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()


# -- NVIDIA's container path: the documented tritonserver command -----------------------------------------


def _documented_tritonserver_args(key: str) -> list[str]:
    """The flags of the `tritonserver` command docs/deploy.md gives for NVIDIA's container, $KEY filled."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    start = text.index("tritonserver --model-repository")
    command = text[start : text.index("\n\n", start)].replace("\\\n", " ").split()
    assert command[0] == "tritonserver", command
    return [arg.replace("$KEY", key) for arg in command[1:] if not arg.startswith("--model-repository")]


def test_the_documented_container_command_closes_the_admin_api(served_lenet_onnx, predictor, tmp_path, monkeypatch):
    """The bundled Triton 2.51 started with exactly the documented flags (plus ports and, for the
    bundled server, its backend folder): model-control none, the admin API refused on both protocols,
    an uploaded model refused and its code not run, inference answered."""
    args = _documented_tritonserver_args(ADMIN_KEY)
    assert not any(arg.startswith("--model-control-mode") for arg in args), args
    repo = tmp_path / "repo"
    package_triton(served_lenet_onnx, repo, name=MODEL, backend="python", max_batch_size=MAX_BATCH)
    triton = TritonServer(
        repo, free_port(), free_port(), free_port(), log_path=tmp_path / "docs.log", admin_key=ADMIN_KEY
    )

    def documented_command():
        return [
            str(triton.server.executable),
            f"--model-repository={triton.repository}",
            *args,
            "--http-address=127.0.0.1",
            f"--http-port={triton._internal_http_port}",
            f"--grpc-port={triton.grpc_port}",
            f"--metrics-port={triton.metrics_port}",
            f"--backend-directory={triton._workdir / 'backends'}",
        ]

    monkeypatch.setattr(triton, "_command", documented_command)
    with triton:
        direct = triton._internal_http_port  # Triton's own HTTP port: the container has no front
        for method, path, body in ADMIN_HTTP:
            raw = f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
            status, answer = _raw_http(direct, raw.encode() + body)
            assert status == 403, (path, status, answer)
        marker = tmp_path / "marker"
        config, files = _uploaded_model(marker)
        load = json.dumps({"parameters": {"config": config, **files}}).encode()
        head = "POST /v2/repository/models/evil/load HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        head += f"{ADMIN_HEADER}: {ADMIN_KEY}\r\nContent-Length: {len(load)}\r\n\r\n"
        status, answer = _raw_http(direct, head.encode() + load)
        assert status != 200, "model-control none must refuse a load even with the key"
        client = grpcclient.InferenceServerClient(f"localhost:{triton.grpc_port}")
        for call in (
            client.get_model_repository_index,
            client.get_system_shared_memory_status,
            client.get_log_settings,
        ):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value
        feed = np.zeros((1, 3, 32, 32), np.float32)
        item = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
        item.set_data_from_numpy(feed)
        assert np.array_equal(client.infer(MODEL, [item]).as_numpy("logits"), _expected_logits(predictor, feed))
        time.sleep(1)
        assert not marker.exists(), "the uploaded model's code ran"
