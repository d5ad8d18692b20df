"""The HTTP front of `subgrad serve` (export/http_guard.py) against a plain upstream: what it refuses,
what it relays byte for byte.  Fast tier; the real server behind it is tests/test_serve.py."""

from __future__ import annotations

import http.client
import http.server
import json
import threading

import pytest

from subgrad.export.http_guard import MAX_JSON_BYTES, HttpGuard, Refusal, check_binary_body, check_request
from subgrad.export.serve import free_port


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        answer = json.dumps({"path": self.path, "bytes": len(body), "expect": self.headers.get("Expect")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def guard():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    front = HttpGuard(free_port(), upstream.server_address[1], max_body_bytes=2 << 20).start()
    yield front
    front.stop()
    upstream.shutdown()


def _request(guard, method, body=b"", headers=None, connection=None):
    connection = connection or http.client.HTTPConnection("127.0.0.1", guard.listen[1], timeout=10)
    connection.request(method, "/v2/models/m/infer", body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read(), connection


def _binary(declared: int, actual: int):
    header = json.dumps({"inputs": [{"name": "x", "parameters": {"binary_data_size": declared}}]}).encode()
    return header + bytes(actual), {"Inference-Header-Content-Length": str(len(header))}


def test_relays_requests_on_one_keep_alive_connection(guard):
    status, body, connection = _request(guard, "POST", b'{"inputs": []}')
    assert status == 200 and json.loads(body) == {"path": "/v2/models/m/infer", "bytes": 14, "expect": None}
    for size in (0, 1, 70001):
        status, body, _ = _request(guard, "POST", *_binary(size, size), connection=connection)
        assert status == 200 and json.loads(body)["bytes"] > size, body
    assert _request(guard, "GET", connection=connection)[0] == 200


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("json over its limit", 413, "send binary tensors"),
        ("body over the limit", 413, "over the server's limit"),
        ("body longer than declared", 400, "declares"),
        ("body shorter than declared", 400, "declares"),
        ("header length beyond the body", 400, "does not frame"),
        ("chunked", 411, "Content-Length"),
    ],
)
def test_refuses_what_triton_would_die_of(guard, case, status, message):
    body, headers = {
        "json over its limit": (b" " * (MAX_JSON_BYTES + 1), {}),
        "body over the limit": _binary(3 << 20, 3 << 20),
        "body longer than declared": _binary(12, 4096),
        "body shorter than declared": _binary(4096, 12),
        "header length beyond the body": (b"{}", {"Inference-Header-Content-Length": "99"}),
        "chunked": (iter([b"abc"]), {"Transfer-Encoding": "chunked"}),
    }[case]
    before = guard.refused
    got, answer, _ = _request(guard, "POST", body, headers)
    assert got == status and message in json.loads(answer)["error"], (case, got, answer)
    assert guard.refused == before + 1
    assert _request(guard, "POST", b"{}")[0] == 200  # and the next request is relayed


def test_expect_100_continue_is_answered_by_the_guard(guard):
    import socket

    with socket.create_connection(("127.0.0.1", guard.listen[1]), timeout=10) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"abcd")
        reply = b""
        while not reply.endswith(b"}"):
            reply += sock.recv(4096)
    assert b" 200 " in reply.split(b"\r\n")[0] and b'"bytes": 4' in reply and b'"expect": null' in reply


def test_check_functions_pass_what_they_should():
    check_request("POST", {"inference-header-content-length": "10"}, 5 << 20, 32 << 20, 1 << 20)
    check_request("GET", {}, 0, 32 << 20, 1 << 20)
    check_binary_body({}, b"anything")  # JSON bodies are Triton's to parse
    body, headers = _binary(3, 3)
    check_binary_body({k.lower(): v for k, v in headers.items()}, body)
    with pytest.raises(Refusal):
        check_request("POST", {}, 2 << 20, 32 << 20, 1 << 20)
