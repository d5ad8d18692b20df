"""The HTTP front of `subgrad serve` (export/http_guard.py) against a plain upstream that records what
reaches it: framing errors, closed endpoints, the admin key, inference checks, connection bounds, and
byte-for-byte relaying.  Fast tier; the real server behind it is tests/test_serve*.py."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time

import pytest

from subgrad.export.http_framing import ADMIN_HEADER
from subgrad.export.http_guard import MAX_JSON_BYTES, HttpGuard
from subgrad.export.infer_check import ModelSpec
from subgrad.export.serve import free_port

SPEC = ModelSpec("m", 4, {"x": (3,), "s": (1,)})
KEY = "front-test-key-0123456789"


class _Upstream(http.server.ThreadingHTTPServer):
    """Echoes what it was sent; counts connections and requests."""

    daemon_threads = True
    connections = 0
    requests: list[tuple[str, str, int]] = []

    def process_request(self, request, client_address):
        type(self).connections += 1
        super().process_request(request, client_address)


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Upstream.requests.append((self.command, self.path, len(body)))
        if self.path.endswith("/config"):
            answer = json.dumps({"name": "late", "max_batch_size": 2, "input": [{"name": "x", "dims": [2]}]})
            answer = answer.encode()
        else:
            answer = json.dumps({"path": self.path, "bytes": len(body), "expect": self.headers.get("Expect")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def upstream():
    server = _Upstream(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def guard(upstream):
    front = HttpGuard(
        free_port(),
        upstream.server_address[1],
        models={"m": SPEC},
        admin_key=KEY,
        max_body_bytes=2 << 20,
        max_connections=8,
        head_timeout_s=0.5,
        idle_timeout_s=0.5,
        body_timeout_s=0.5,
    ).start()
    yield front
    front.stop(1)


def _raw(guard, data: bytes, timeout_s: float = 10) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", guard.listen[1]), timeout=timeout_s) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]) if head else 0, body


def _infer(request: dict, binary: bytes = b"", path: str = "/v2/models/m/infer", extra: str = "") -> bytes:
    header = json.dumps(request).encode()
    lengths = f"Inference-Header-Content-Length: {len(header)}\r\n" if binary else ""
    body = header + binary
    return (
        f"POST {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{lengths}{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


VALID = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6.5]}]}


def test_relays_valid_requests_byte_for_byte_on_one_keep_alive_connection(guard, upstream):
    before = upstream.connections
    connection = http.client.HTTPConnection("127.0.0.1", guard.listen[1], timeout=10)
    for _ in range(3):
        connection.request("POST", "/v2/models/m/infer", body=json.dumps(VALID))
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["bytes"] == len(json.dumps(VALID))
    x = {"name": "x", "shape": [1, 3], "datatype": "INT16", "parameters": {"binary_data_size": 6}}
    header = json.dumps({"inputs": [x]})
    path = "/v2/models/m/versions/1/infer"
    lengths = {"Inference-Header-Content-Length": str(len(header))}
    connection.request("POST", path, body=header.encode() + bytes(6), headers=lengths)
    assert connection.getresponse().read() and upstream.requests[-1] == ("POST", path, len(header) + 6)
    for path in ("/v2", "/v2/health/ready", "/v2/models/m", "/v2/models/m/config", "/v2/models/stats"):
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200 and response.read() and upstream.requests[-1][1] == path
    assert upstream.connections == before + 1, "one upstream connection per client connection"


INFER = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h\r\n"
FRAMING = {  # raw request -> (status, part of the message)
    "two Content-Length values": (INFER + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "more than once"),
    "folded header (leading space)": (INFER + b" Content-Length: 2\r\n\r\n{}", 400, "malformed header"),
    "space before the colon": (INFER + b"Content-Length : 2\r\n\r\n{}", 400, "malformed header"),
    "negative Content-Length": (INFER + b"Content-Length: -2\r\n\r\n", 400, "non-negative"),
    "signed Content-Length": (INFER + b"Content-Length: +2\r\n\r\n{}", 400, "non-negative"),
    "non-numeric Content-Length": (INFER + b"Content-Length: abc\r\n\r\n", 400, "non-negative"),
    "huge Content-Length": (INFER + b"Content-Length: " + b"9" * 30 + b"\r\n\r\n", 400, "non-negative"),
    "non-numeric Inference-Header-Content-Length": (
        INFER + b"Inference-Header-Content-Length: x\r\nContent-Length: 2\r\n\r\n{}",
        400,
        "non-negative",
    ),
    "no Host": (b"GET /v2 HTTP/1.1\r\n\r\n", 400, "Host"),
    "junk request line": (b"\x00\x01\x02 garbage\r\n\r\n", 400, "request line"),
    "absolute-form target": (b"GET http://evil/v2 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "request line"),
    "control character in a value": (b"GET /v2 HTTP/1.1\r\nHost: h\x01\r\n\r\n", 400, "control character"),
    "bare LF inside the head": (b"GET /v2 HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", 400, "control character"),
    "chunked body": (INFER + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411, "Content-Length"),
    "head over 64 KiB": (b"GET /v2 HTTP/1.1\r\nHost: h\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n", 431, "head"),
    "body over the limit": (INFER + b"Content-Length: 3000000\r\n\r\n", 413, "limit"),
    "unknown Expect": (INFER + b"Expect: magic\r\nContent-Length: 2\r\n\r\n{}", 417, "100-continue"),
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_framing_errors_get_a_4xx_never_a_500_or_a_silent_close(guard, upstream, case):
    raw, status, message = FRAMING[case]
    before = len(upstream.requests)
    got, body = _raw(guard, raw)
    assert got == status and message in json.loads(body)["error"], (case, got, body)
    assert len(upstream.requests) == before, "a refused request reached the upstream"


ROUTES = [  # (method, path, status without the key)
    ("POST", "/v2/repository/index", 403),
    ("POST", "/v2/repository/models/m/load", 403),
    ("POST", "/v2/repository/models/m/unload", 403),
    ("POST", "/v2/%72epository/models/m/unload", 403),
    ("GET", "/v2/systemsharedmemory/status", 403),
    ("POST", "/v2/systemsharedmemory/region/r/register", 403),
    ("POST", "/v2/cudasharedmemory/region/r/register", 403),
    ("POST", "/v2/trace/setting", 403),
    ("POST", "/v2/models/m/trace/setting", 403),
    ("POST", "/v2/logging", 403),
    ("GET", "//v2/repository/index", 404),
    ("GET", "/v2/models/m/infer", 405),
    ("POST", "/v2/models/m", 405),
    ("GET", "/v2/models/m/generate", 404),
    ("GET", "/metrics", 404),
    ("GET", "/v2/models/m?x=1", 404),
    ("GET", "/v2/models/../repository/index", 404),
]


@pytest.mark.parametrize("method, path, status", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_only_the_open_api_is_relayed_without_the_key(guard, upstream, method, path, status):
    before = len(upstream.requests)
    for key in ("", f"{ADMIN_HEADER}: wrong-{KEY}\r\n"):
        raw = f"{method} {path} HTTP/1.1\r\nHost: h\r\n{key}Content-Length: 2\r\n\r\n{{}}".encode()
        got, body = _raw(guard, raw)
        assert got == status and json.loads(body)["error"], (got, body)
    assert len(upstream.requests) == before
    keyed = f"{method} {path} HTTP/1.1\r\nHost: h\r\n{ADMIN_HEADER}: {KEY}\r\nConnection: close\r\n"
    keyed += "Content-Length: 2\r\n\r\n{}"
    got, _ = _raw(guard, keyed.encode())
    # (the upstream, Python's http.server, reads '//v2' as '/v2')
    assert got == 200 and upstream.requests[-1][0] == method, "the key opens every endpoint"
    assert upstream.requests[-1][1].lstrip("/") == path.lstrip("/")


def _x(shape, data, name="x"):
    return {"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data}]}


@pytest.mark.parametrize(
    "request_, status, message",
    [
        (_x([10**8, 3], [1.0]), 400, "more than model"),
        (_x([-1, 3], [1.0]), 400, "negative"),
        (_x([2, 3], [1.0]), 400, "'data' has 1"),
        (_x([1, 3], [1, 2, 3], name="y"), 400, "unexpected inference input"),
        ({**_x([1, 3], [1, 2, 3]), "parameters": {"binary_data_output": 0}}, 400, "must be a boolean"),
        ({"inputs": []}, 200, None),
    ],
)
def test_inference_requests_are_checked_against_the_model(guard, upstream, request_, status, message):
    before = len(upstream.requests)
    got, body = _raw(guard, _infer(request_))
    assert got == status, (got, body)
    if message:
        assert message in json.loads(body)["error"] and len(upstream.requests) == before


def test_binary_requests_and_their_lengths(guard):
    header = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}
    assert _raw(guard, _infer(header, bytes(12)))[0] == 200
    for size in (11, 13, 4096):
        got, body = _raw(guard, _infer(header, bytes(size)))
        assert got == 400 and "binary" in json.loads(body)["error"], (size, body)
    huge = {"inputs": [{"name": "x", "shape": [10**9, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}
    assert _raw(guard, _infer(huge, bytes(12)))[0] == 400
    got, body = _raw(guard, _infer({"inputs": [" " * (MAX_JSON_BYTES + 1)]}))
    assert got == 413 and "send binary tensors" in json.loads(body)["error"]


def test_a_model_the_front_has_not_seen_is_learnt_from_the_config_endpoint(guard):
    assert _raw(guard, _infer(_x([2, 2], [1, 2, 3, 4]), path="/v2/models/late/infer"))[0] == 200
    assert guard.models["late"] == ModelSpec("late", 2, {"x": (2,)})
    assert _raw(guard, _infer(_x([3, 2], [0] * 6), path="/v2/models/late/infer"))[0] == 400  # over max_batch_size 2


def test_expect_100_continue_is_answered_by_the_front(guard):
    with socket.create_connection(("127.0.0.1", guard.listen[1]), timeout=10) as sock:
        body = json.dumps(VALID).encode()
        sock.sendall(INFER + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        reply = b""
        while not reply.endswith(b"}"):
            reply += sock.recv(4096)
    assert b" 200 " in reply.split(b"\r\n")[0] and b'"expect": null' in reply


# -- connection bounds ----------------------------------------------------------------------------------


def test_a_head_that_never_ends_gets_408(guard, upstream):
    before = upstream.connections
    start = time.monotonic()
    got, body = _raw(guard, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h\r\n")
    assert got == 408 and time.monotonic() - start < 5, (got, body)
    assert upstream.connections == before, "an upstream connection was opened for an incomplete head"


def test_a_body_that_stops_gets_408_and_an_idle_connection_is_closed(guard, upstream):
    got, body = _raw(guard, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n{")
    assert got == 408 and "body" in json.loads(body)["error"]
    with socket.create_connection(("127.0.0.1", guard.listen[1]), timeout=10) as sock:
        start = time.monotonic()
        assert sock.recv(10) == b"" and time.monotonic() - start < 5  # closed without a request: no answer


def test_connections_over_the_cap_get_503_and_the_cap_frees_up(guard):
    idle = [socket.create_connection(("127.0.0.1", guard.listen[1])) for _ in range(guard.max_connections)]
    try:
        time.sleep(0.1)
        got, body = _raw(guard, b"GET /v2 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert got == 503 and "too many connections" in json.loads(body)["error"]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert _raw(guard, b"GET /v2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")[0] == 200


def test_an_upstream_that_is_down_gets_503_then_retarget_serves_again(guard, upstream):
    guard.retarget(free_port())  # nothing listens there
    got, body = _raw(guard, b"GET /v2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert got == 503 and "restarting" in json.loads(body)["error"]
    guard.retarget(upstream.server_address[1])
    assert _raw(guard, b"GET /v2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")[0] == 200


def test_a_header_that_passed_passes_again_only_with_the_same_binary_length(guard):
    header = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}
    assert _raw(guard, _infer(header, bytes(12)))[0] == 200
    assert len(guard.passed) == 1
    assert _raw(guard, _infer(header, bytes(12)))[0] == 200
    assert _raw(guard, _infer(header, bytes(16)))[0] == 400  # same header, other length: checked again
    strings = {"inputs": [{"name": "s", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}]}
    assert _raw(guard, _infer(strings, b"\x03\x00\x00\x00abc"))[0] == 200
    assert _raw(guard, _infer(strings, b"\x09\x00\x00\x00abc"))[0] == 400  # BYTES: their framing is read each time
    assert len(guard.passed) == 1
