"""The HTTP front of `subgrad serve`: what reaches Triton is a request it survives, on an open API.

Triton 2.51's HTTP frontend (the server in the ``serve`` extra) dies on requests a client can send in a
few hundred bytes: a JSON body of a few MB (SIGSEGV; upstream issue triton-inference-server/server#5840),
a binary body longer than its header declares, a ``shape`` far larger than its data (``std::bad_alloc``).
It answers 500 to framing errors and to data that disagrees with its shape, and its admin APIs would
load code a client uploads.  So ``subgrad serve`` binds Triton's HTTP port to 127.0.0.1 and puts this
front on the public port.  Per connection and request it:

* bounds the connection: at most ``max_connections`` at once (503 past it), the head within
  ``head_timeout_s`` of its first byte (408), the next request within ``idle_timeout_s`` (closed),
  no ``body_timeout_s`` without body bytes (408); Triton's connection is opened only for a complete,
  checked request;
* parses the head strictly (RFC 9112) and answers 400 to a malformed request line or header line,
  folded headers, a repeated, signed or non-numeric ``Content-Length``, a missing ``Host``; 411 to
  ``Transfer-Encoding``; 431 to a head over 64 KiB; 413 to a body over ``max_body_bytes``, or a JSON
  inference header over ``max_json_bytes``;
* relays only the open API: health, server and model metadata, model config, statistics, inference
  (classification included).  Model repository, shared memory, trace and logging answer 403 unless the
  request carries the admin key header (Triton checks it again: ``serve.py``); any other path 404;
* checks an inference request against the model it names (:mod:`.infer_check`: shapes backed by the
  data sent, 400 otherwise) before a byte of it goes on;
* answers 503 while Triton is down (``subgrad serve`` restarts it) and 502 when it fails mid-request.

Answers of its own are Triton's shape, ``{"error": "..."}``, and close the connection.  Everything that
passes is relayed byte for byte over one upstream connection per client connection (keep-alive both
ways).  gRPC needs no front: gRPC's framing bounds messages and Triton checks them (tests/test_serve.py
fuzzes both).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import sys
import threading
import urllib.parse

from .infer_check import BadRequest, ModelSpec, check_infer_request, parse_json

#: Largest request body relayed.  A batch of 256 LeNet inputs as binary float32 is 3 MiB.
MAX_BODY_BYTES = 32 << 20
#: Largest JSON inference header (a whole JSON body, or the JSON part of a binary one): Triton's JSON
#: parser is what crashes.  A batch of 8 CIFAR-10 images as JSON numbers is about 0.3 MB.
MAX_JSON_BYTES = 1 << 20
MAX_HEAD_BYTES = 64 << 10
MAX_CONNECTIONS = 256
HEAD_TIMEOUT_S = 10.0  # from a request's first byte to the end of its head
IDLE_TIMEOUT_S = 60.0  # a keep-alive connection waiting for its next request
BODY_TIMEOUT_S = 30.0  # longest wait for the next bytes of a body
LINGER_S = 5.0  # after a refusal, how long what the client still sends is read and dropped before closing
#: The request header that carries the admin key (Triton's --http-restricted-api names the same).
ADMIN_HEADER = "subgrad-admin-key"
_READ_CHUNK = 1 << 20

_MODEL = r"(?P<model>[A-Za-z0-9_.-]+)(?:/versions/[0-9]+)?"
_OPEN_ROUTES = [  # (method, path pattern) of the API clients may use without the key
    ("GET", re.compile(r"/v2(?:/health/(?:live|ready))?")),
    ("GET", re.compile(r"/v2/models/stats")),
    ("GET", re.compile(rf"/v2/models/{_MODEL}(?:/ready|/config|/stats)?")),
    ("POST", re.compile(rf"/v2/models/{_MODEL}/infer")),
]
_ADMIN_ROUTE = re.compile(
    r"/v2/(?:repository|systemsharedmemory|cudasharedmemory|trace|logging)(?:/.*)?|/v2/models/[^/]+/trace(?:/.*)?"
)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_REQUEST_LINE = re.compile(rb"(?P<method>[A-Z]+) (?P<target>/[\x21-\x7e]*) HTTP/1\.(?P<minor>[01])")


async def _within(awaitable, seconds: float):
    """``await awaitable``, raising asyncio.TimeoutError after ``seconds``.  asyncio.timeout (Python 3.11+)
    runs it in the current task; wait_for, the fallback, starts a task per call: on the hot path of every
    request that cost a quarter of the front's time."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class Refusal(Exception):
    """A request the front answers itself: status, reason phrase, message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


def _bad(message: str) -> Refusal:
    return Refusal(400, "Bad Request", message)


class Head:
    """A parsed request head: method, target, HTTP minor version, headers (lower-case names)."""

    def __init__(self, raw: bytes):
        lines = raw[:-4].split(b"\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise _bad("malformed request line; expected 'METHOD /path HTTP/1.1'")
        self.raw = raw
        self.method = match["method"].decode()
        self.target = match["target"].decode()
        self.keep_alive_default = match["minor"] == b"1"
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise _bad("malformed header line (a name, then ':' with no space before it, then the value)")
            value = value.strip(b" \t")
            if not _FIELD_VALUE.fullmatch(value):
                raise _bad(f"header {name.decode()!r} has a control character in its value")
            key = name.decode().lower()
            if key in self.headers and key in ("content-length", "host", "inference-header-content-length"):
                raise _bad(f"header {key!r} appears more than once")
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        if "host" not in self.headers and self.keep_alive_default:
            raise _bad("HTTP/1.1 request without a Host header")
        if "transfer-encoding" in self.headers:
            raise Refusal(411, "Length Required", "Transfer-Encoding is not accepted; send Content-Length")
        self.length = self._number("content-length", 0)
        self.json_length = self._number("inference-header-content-length", None)

    def _number(self, name: str, default):
        value = self.headers.get(name)
        if value is None:
            return default
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            raise _bad(f"{name} must be a non-negative decimal number, got {value[:40]!r}")
        return int(value)

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        return "keep-alive" in connection if not self.keep_alive_default else "close" not in connection

    def without(self, name: bytes) -> bytes:
        """The raw head with every ``name:`` header line removed (``name`` lower-case)."""
        lines = self.raw[:-4].split(b"\r\n")
        return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":")) + b"\r\n\r\n"


def _response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class HttpGuard:
    """Relay ``listen_host:listen_port`` -> ``upstream_host:upstream_port`` in a daemon thread, as the module
    docstring says.  ``models``: the served models' specs (learnt from Triton's config endpoint when a
    request names another).  ``admin_key``: the key that opens the admin API (None: closed to all)."""

    def __init__(
        self,
        listen_port: int,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        upstream_host: str = "127.0.0.1",
        models: dict[str, ModelSpec] | None = None,
        admin_key: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_json_bytes: int = MAX_JSON_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ):
        self.listen = (listen_host, listen_port)
        self.upstream = (upstream_host, upstream_port)
        self.models = dict(models or {})
        self.admin_key = admin_key
        self.max_body_bytes, self.max_json_bytes = max_body_bytes, max_json_bytes
        self.max_connections = max_connections
        self.head_timeout_s, self.idle_timeout_s, self.body_timeout_s = head_timeout_s, idle_timeout_s, body_timeout_s
        self.refused = 0  # requests answered by the front itself
        self._generation = 0  # bumped by retarget(): upstream connections of an older one are reopened
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()  # open client and upstream connections
        self._clients = 0
        self._in_flight = 0  # requests relayed upstream and not yet answered

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "HttpGuard":
        ready, failure = threading.Event(), []

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._serve, *self.listen, limit=MAX_HEAD_BYTES, reuse_address=True)
                )
            except OSError as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="subgrad-http-guard", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def retarget(self, upstream_port: int) -> None:
        """Relay to a new upstream port (a restarted server); open connections reconnect on their next request."""
        self.upstream = (self.upstream[0], upstream_port)
        self._generation += 1

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish (up to ``drain_timeout_s``), close every connection
        (Triton's own shutdown waits for open HTTP connections)."""
        if self._loop is None or not self._loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(drain_timeout_s), self._loop).result(drain_timeout_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _shutdown(self, drain_timeout_s: float) -> None:
        self._server.close()
        deadline = self._loop.time() + drain_timeout_s
        while self._in_flight and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        for writer in list(self._writers):
            writer.close()

    # -- one client connection ------------------------------------------------------------------------
    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        self._clients += 1
        upstream = None  # (reader, writer, generation), opened for the first relayed request
        try:
            if self._clients > self.max_connections:
                await self._refuse(
                    client_r, client_w, Refusal(503, "Service Unavailable", "too many connections; retry")
                )
                return
            while True:
                head = await self._read_head(client_r, client_w)
                if head is None:
                    return
                try:
                    body = await self._read_checked(head, client_r, client_w)
                except Refusal as refusal:
                    await self._refuse(client_r, client_w, refusal)
                    return
                if upstream is None or upstream[2] != self._generation or upstream[0].at_eof():
                    self._close(upstream)
                    try:
                        reader, writer = await _within(asyncio.open_connection(*self.upstream), 5.0)
                    except (OSError, asyncio.TimeoutError):
                        await self._refuse(
                            client_r, client_w, Refusal(503, "Service Unavailable", "the server is restarting")
                        )
                        return
                    self._writers.add(writer)
                    upstream = (reader, writer, self._generation)
                if not await self._relay(head, body, upstream, client_r, client_w) or not head.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the client went away
        finally:
            self._clients -= 1
            self._close(upstream)
            client_w.close()
            self._writers.discard(client_w)

    async def _read_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Head | None:
        """The next request's head; None when the connection is finished (idle, closed or answered)."""
        try:
            first = await _within(reader.readexactly(1), self.idle_timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return None
        try:
            raw = first + await _within(reader.readuntil(b"\r\n\r\n"), self.head_timeout_s)
            return Head(raw)
        except asyncio.TimeoutError:
            refusal = Refusal(408, "Request Timeout", f"request head not complete within {self.head_timeout_s:g} s")
        except asyncio.LimitOverrunError:
            refusal = Refusal(431, "Request Header Fields Too Large", f"request head over {MAX_HEAD_BYTES} bytes")
        except asyncio.IncompleteReadError:
            return None
        except Refusal as exc:
            refusal = exc
        await self._refuse(reader, writer, refusal)
        return None

    async def _read_checked(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """The request's body, once its route, sizes and (for inference) contents pass; else Refusal."""
        admin = self.admin_key is not None and hmac.compare_digest(
            head.headers.get(ADMIN_HEADER, "").encode("latin-1"), self.admin_key.encode()
        )
        path = urllib.parse.unquote(head.target.split("?", 1)[0])
        model = None
        if not admin:
            if _ADMIN_ROUTE.fullmatch(path):
                raise Refusal(403, "Forbidden", f"This API is restricted, expecting header '{ADMIN_HEADER}'")
            routes = [(method, pattern.fullmatch(head.target)) for method, pattern in _OPEN_ROUTES]
            allowed = [method for method, match in routes if match]
            if not allowed:
                raise Refusal(404, "Not Found", f"no such endpoint: {head.target[:100]}")
            if head.method not in allowed:
                raise Refusal(405, "Method Not Allowed", f"{head.target[:100]} takes {' or '.join(allowed)}")
        match = _OPEN_ROUTES[3][1].fullmatch(path)
        if head.method == "POST" and match:
            model = await self._model(match["model"])
        if head.length > self.max_body_bytes:
            raise Refusal(
                413,
                "Payload Too Large",
                f"request body of {head.length} bytes is over the server's limit of {self.max_body_bytes} bytes; "
                "send smaller batches",
            )
        json_length = head.length if head.json_length is None else head.json_length
        if model is not None and json_length > self.max_json_bytes:
            raise Refusal(
                413,
                "Payload Too Large",
                f"JSON inference header of {json_length} bytes is over the limit of {self.max_json_bytes} bytes; "
                "send binary tensors (tritonclient's default) or smaller batches",
            )
        expect = head.headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise Refusal(417, "Expectation Failed", "only 'Expect: 100-continue' is understood")
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            head.raw = head.without(b"expect")
        body = await self._read_body(reader, head.length)
        if model is not None:
            if json_length > len(body):
                raise _bad("Inference-Header-Content-Length is longer than the body")
            try:
                check_infer_request(parse_json(body[:json_length]), body[json_length:], model, admin)
            except BadRequest as exc:
                raise _bad(str(exc)) from None
        return body

    async def _read_body(self, reader: asyncio.StreamReader, length: int) -> bytes:
        chunks = []
        while length > 0:
            try:
                chunk = await _within(reader.read(min(length, _READ_CHUNK)), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise Refusal(408, "Request Timeout", f"no body bytes for {self.body_timeout_s:g} s") from None
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(chunks), length)
            chunks.append(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    async def _model(self, name: str) -> ModelSpec:
        """The spec of a served model, learnt from Triton's config endpoint the first time it is named."""
        if name not in self.models:
            try:
                reader, writer = await _within(asyncio.open_connection(*self.upstream), 5.0)
                writer.write(f"GET /v2/models/{name}/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                answer = await _within(reader.read(), 10.0)
                writer.close()
                status, _, body = answer.partition(b"\r\n\r\n")
                if b" 200 " not in status.split(b"\r\n")[0]:
                    raise Refusal(404, "Not Found", f"unknown model {name!r}")
                self.models[name] = ModelSpec.from_config(json.loads(body))
            except (OSError, asyncio.TimeoutError, ValueError, KeyError):
                raise Refusal(503, "Service Unavailable", "the server is restarting") from None
        return self.models[name]

    async def _relay(self, head: Head, body: bytes, upstream, client_r, client_w) -> bool:
        """Send one request upstream and its answer back; False when either connection is finished."""
        upstream_r, upstream_w, _ = upstream
        self._in_flight += 1
        answered = False
        try:
            upstream_w.write(head.raw + body)
            await upstream_w.drain()
            raw = await upstream_r.readuntil(b"\r\n\r\n")  # Triton's answer: read its length and connection
            lines = (line.partition(":") for line in raw.decode("latin-1").split("\r\n")[1:])
            headers = {name.strip().lower(): value.strip() for name, _, value in lines}
            remaining = int(headers.get("content-length", "0") or 0)
            if remaining <= _READ_CHUNK:  # the usual answer: one write (one packet) to the client
                client_w.write(raw + await upstream_r.readexactly(remaining))
                answered = True
            else:
                client_w.write(raw)
                answered = True
                while remaining > 0:
                    chunk = await upstream_r.read(min(remaining, _READ_CHUNK))
                    if not chunk:
                        return False
                    client_w.write(chunk)
                    remaining -= len(chunk)
            await client_w.drain()
            return headers.get("connection", "").lower() != "close"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if not answered:
                await self._refuse(
                    client_r, client_w, Refusal(502, "Bad Gateway", "the server failed during the request")
                )
            return False
        finally:
            self._in_flight -= 1

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refusal: Refusal) -> None:
        """Answer ``refusal`` and end the connection: half-close, then read and drop what the client still
        sends (up to LINGER_S), so that it reads the answer instead of a reset."""
        self.refused += 1
        writer.write(_response(refusal.status, refusal.reason, str(refusal)))
        try:
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await _within(self._drop(reader), LINGER_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass

    @staticmethod
    async def _drop(reader: asyncio.StreamReader) -> None:
        while await reader.read(_READ_CHUNK):
            pass

    def _close(self, upstream) -> None:
        if upstream is not None:
            upstream[1].close()
            self._writers.discard(upstream[1])
