"""HTTP/1.1 framing for the front of `subgrad serve` (http_guard.py): strict request heads, the open routes,
the front's own answers.  Pure functions and small classes; no sockets.

A head is parsed as RFC 9112 requires of a server that relays it: one request line
``METHOD /path HTTP/1.x``; header lines ``name: value`` with no space before the colon and no folding;
no control characters; ``Content-Length`` (and Triton's ``Inference-Header-Content-Length``) once, as
plain decimal digits; no ``Transfer-Encoding``.  Anything else is a :class:`Refusal` (400, or 411 for
``Transfer-Encoding``), so that the front and Triton can never read one request two ways.
"""

from __future__ import annotations

import json
import re
import urllib.parse

#: The request header that carries the admin key (Triton's --http-restricted-api names the same).
ADMIN_HEADER = "subgrad-admin-key"

_MODEL = r"(?P<model>[A-Za-z0-9_.-]+)(?:/versions/[0-9]+)?"
#: (method, path pattern) of the API every client may use: health, metadata, config, statistics, inference.
OPEN_ROUTES = [
    ("GET", re.compile(r"/v2(?:/health/(?:live|ready))?")),
    ("GET", re.compile(r"/v2/models/stats")),
    ("GET", re.compile(rf"/v2/models/{_MODEL}(?:/ready|/config|/stats)?")),
    ("POST", re.compile(rf"/v2/models/{_MODEL}/infer")),
]
_INFER = OPEN_ROUTES[3][1]
#: Triton's restricted groups (model repository, shared memory, trace, logging), percent-decoded.
_ADMIN_ROUTE = re.compile(
    r"/v2/(?:repository|systemsharedmemory|cudasharedmemory|trace|logging)(?:/.*)?|/v2/models/[^/]+/trace(?:/.*)?"
)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_REQUEST_LINE = re.compile(rb"(?P<method>[A-Z]+) (?P<target>/[\x21-\x7e]*) HTTP/1\.(?P<minor>[01])")
_ONCE = ("content-length", "host", "inference-header-content-length", ADMIN_HEADER)


class Refusal(Exception):
    """A request the front answers itself: status, reason phrase, message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason

    def response(self) -> bytes:
        """The answer, in Triton's ``{"error": ...}`` shape; the connection closes after it."""
        body = json.dumps({"error": str(self)}).encode()
        return (
            f"HTTP/1.1 {self.status} {self.reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body


def bad_request(message: str) -> Refusal:
    return Refusal(400, "Bad Request", message)


class Head:
    """A parsed request head: method, target, whether the connection stays open, headers (lower-case names),
    the body's length and the JSON part's length (``Inference-Header-Content-Length``, None without)."""

    def __init__(self, raw: bytes):
        lines = raw[:-4].split(b"\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise bad_request("malformed request line; expected 'METHOD /path HTTP/1.1'")
        self.raw = raw
        self.method = match["method"].decode()
        self.target = match["target"].decode()
        http11 = match["minor"] == b"1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise bad_request("malformed header line (a name, then ':' with no space before it, then the value)")
            value = value.strip(b" \t")
            if not _FIELD_VALUE.fullmatch(value):
                raise bad_request(f"header {name.decode()!r} has a control character in its value")
            key, text = name.decode().lower(), value.decode("latin-1")
            if key in headers:
                if key in _ONCE:
                    raise bad_request(f"header {key!r} appears more than once")
                text = f"{headers[key]}, {text}"
            headers[key] = text
        self.headers = headers
        if http11 and "host" not in headers:
            raise bad_request("HTTP/1.1 request without a Host header")
        if "transfer-encoding" in headers:
            raise Refusal(411, "Length Required", "Transfer-Encoding is not accepted; send Content-Length")
        self.length = self._number("content-length", 0)
        self.json_length = self._number("inference-header-content-length", None)
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection if http11 else "keep-alive" in connection

    def _number(self, name: str, default):
        value = self.headers.get(name)
        if value is None:
            return default
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            raise bad_request(f"{name} must be a non-negative decimal number, got {value[:40]!r}")
        return int(value)

    def without(self, name: bytes) -> bytes:
        """The raw head with every ``name:`` header line removed (``name`` lower-case)."""
        lines = self.raw[:-4].split(b"\r\n")
        return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":")) + b"\r\n\r\n"


def route(head: Head, admin: bool) -> str | None:
    """Refuse a request outside the API its client may use (403 admin without the key, 404, 405); the
    model an inference request names (None for any other request)."""
    path = urllib.parse.unquote(head.target.split("?", 1)[0])
    if not admin:
        if _ADMIN_ROUTE.fullmatch(path):
            raise Refusal(403, "Forbidden", f"This API is restricted, expecting header '{ADMIN_HEADER}'")
        allowed = [method for method, pattern in OPEN_ROUTES if pattern.fullmatch(head.target)]
        if not allowed:
            raise Refusal(404, "Not Found", f"no such endpoint: {head.target[:100]}")
        if head.method not in allowed:
            raise Refusal(405, "Method Not Allowed", f"{head.target[:100]} takes {' or '.join(allowed)}")
    match = _INFER.fullmatch(path)
    return match["model"] if match and head.method == "POST" else None


def response_framing(raw: bytes) -> tuple[int, bool]:
    """(body length, keep-alive) of an upstream (Triton) response head."""
    length, keep_alive = 0, True
    for line in raw.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep_alive = b"close" not in value.lower()
    return length, keep_alive
