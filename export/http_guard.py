"""The HTTP front of `subgrad serve`: what reaches Triton is a request it survives, on an open API.

Triton 2.51's HTTP frontend (the server in the ``serve`` extra) dies on requests a client can send in a
few hundred bytes: a JSON body of a few MB (SIGSEGV; upstream issue triton-inference-server/server#5840),
a binary body longer than its header declares, a ``shape`` far larger than its data (``std::bad_alloc``).
It answers 500 to framing errors and to data that disagrees with its shape, and its admin APIs would
load code a client uploads.  So ``subgrad serve`` binds Triton's HTTP port to 127.0.0.1 and puts this
front on the public port.  Per connection and request it:

* bounds the connection: at most ``max_connections`` at once (503 past it), the head within
  ``head_timeout_s`` of its first byte (408), the next request within ``idle_timeout_s`` (closed), no
  ``body_timeout_s`` without body bytes (408); Triton's connection is opened only for a complete,
  checked request;
* parses the head strictly (:mod:`.http_framing`): 400 to a malformed request line or header line,
  folded headers, a repeated, signed or non-numeric ``Content-Length``, a missing ``Host``; 411 to
  ``Transfer-Encoding``; 431 to a head over 64 KiB; 413 to a body over ``max_body_bytes``, or a JSON
  inference header over ``max_json_bytes``;
* relays only the open API: health, server and model metadata, model config, statistics, inference
  (classification included).  Model repository, shared memory, trace and logging answer 403 unless the
  request carries the admin key header (Triton checks it again: ``serve.py``); any other path 404;
* checks an inference request against the model it names (:mod:`.infer_check`: shapes backed by the
  data sent, 400 otherwise) before a byte of it goes on;
* answers 503 while Triton is down (``subgrad serve`` restarts it) and 502 when it fails mid-request.

Answers of its own are Triton's shape, ``{"error": "..."}``, and end the connection.  Everything that
passes is relayed byte for byte over one upstream connection per client connection (keep-alive both
ways).  It is written with asyncio protocols rather than streams: a request costs a head parse, the
checks and two socket writes, which keeps the hop it adds close to a C relay's (benchmarks/serve.py).
gRPC needs no front: gRPC's framing bounds messages and Triton checks them (tests/test_serve_attack.py
fuzzes both).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading

from .http_framing import ADMIN_HEADER, Head, Refusal, bad_request, response_framing, route
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
CONNECT_TIMEOUT_S = 5.0  # opening a connection to Triton
PASSED_HEADERS = 1024  # JSON headers remembered as checked (_Client._check), each under PASSED_HEADER_BYTES
PASSED_HEADER_BYTES = 4096


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
        self.generation = 0  # bumped by retarget(): upstream connections of an older one are reopened
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: set[_Client] = set()
        self.in_flight = 0  # requests relayed upstream and not yet answered
        self.passed: set[tuple] = set()  # (model, admin, binary length, JSON header) that passed the checks
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "HttpGuard":
        ready, failure = threading.Event(), []

        def run():
            self.loop = asyncio.new_event_loop()
            try:
                self._server = self.loop.run_until_complete(
                    self.loop.create_server(
                        lambda: _Client(self), *self.listen, reuse_address=True, backlog=self.max_connections
                    )
                )
            except OSError as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="subgrad-http-guard", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def retarget(self, upstream_port: int) -> None:
        """Relay to a new upstream port (a restarted server); open connections reconnect on their next request."""
        self.upstream = (self.upstream[0], upstream_port)
        self.generation += 1

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish (up to ``drain_timeout_s``), close every connection
        (Triton's own shutdown waits for open HTTP connections)."""
        if self.loop is None or not self.loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(drain_timeout_s), self.loop).result(drain_timeout_s + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    async def _shutdown(self, drain_timeout_s: float) -> None:
        self._server.close()
        deadline = self.loop.time() + drain_timeout_s
        while self.in_flight and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for client in list(self.clients):
            client.close()

    async def model(self, name: str) -> ModelSpec:
        """The spec of a served model, learnt from Triton's config endpoint the first time it is named."""
        if name not in self.models:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_S)
                writer.write(f"GET /v2/models/{name}/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                answer = await asyncio.wait_for(reader.read(), 10.0)
                writer.close()
                status, _, body = answer.partition(b"\r\n\r\n")
                if b" 200 " not in status.split(b"\r\n")[0]:
                    raise Refusal(404, "Not Found", f"unknown model {name!r}")
                self.models[name] = ModelSpec.from_config(json.loads(body))
            except (OSError, asyncio.TimeoutError, ValueError, KeyError):
                raise Refusal(503, "Service Unavailable", "the server is restarting") from None
        return self.models[name]


class _Client(asyncio.Protocol):
    """One client connection: a state machine over its bytes.  States: ``idle`` (between requests),
    ``head`` (a head has begun), ``body``, ``checking`` (a model's spec is being learnt), ``upstream``
    (relayed, waiting for Triton's answer), ``closing`` (answered by the front; dropping what arrives)."""

    def __init__(self, guard: HttpGuard):
        self.guard = guard
        self.buffer = bytearray()
        self.state = "idle"
        self.head: Head | None = None
        self.model: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.upstream: _Upstream | None = None
        self.transport: asyncio.Transport | None = None
        self.admin = False  # the current request carries the admin key
        self.ended = False  # the client half-closed: close once its answer is sent

    # -- asyncio's callbacks --------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.guard.clients.add(self)
        if len(self.guard.clients) > self.guard.max_connections:
            self.refuse(Refusal(503, "Service Unavailable", "too many connections; retry"))
        else:
            self._arm(self.guard.idle_timeout_s, self.close)

    def data_received(self, data: bytes) -> None:
        if self.state == "closing":
            return  # a refused request's remaining bytes: dropped
        self.buffer += data
        if self.state == "body":
            self._arm(self.guard.body_timeout_s, self._body_timeout)
        if len(self.buffer) > self.guard.max_body_bytes + 2 * MAX_HEAD_BYTES:
            self.transport.pause_reading()  # pipelined requests beyond one: wait for the answer first
        self._advance()

    def eof_received(self):
        self.ended = True
        return self.state in ("upstream", "checking")  # half-closed after its request: keep it for the answer

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.guard.clients.discard(self)
        if self.state == "upstream":
            self.guard.in_flight -= 1
        self.state = "closing"
        if self.upstream is not None:
            self.upstream.transport.close()

    def pause_writing(self) -> None:  # the client reads slower than Triton answers
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- requests -------------------------------------------------------------------------------------
    def _advance(self) -> None:
        """Take the next request as far as the buffered bytes allow."""
        while self.state in ("idle", "head", "body"):
            try:
                if self.state != "body":
                    if not self._take_head():
                        return
                if len(self.buffer) < self.head.length:
                    return
                body = bytes(self.buffer[: self.head.length])
                del self.buffer[: self.head.length]
                self._disarm()
                if self.model is not None and self.model not in self.guard.models:
                    self.state = "checking"
                    self.transport.pause_reading()
                    self.guard.loop.create_task(self._learn_then_relay(body))
                    return
                self._check(body)
            except Refusal as refusal:
                self.refuse(refusal)
                return
            self._relay(self.head.raw + body)

    def _take_head(self) -> bool:
        """Parse and route the next head once it is complete (True), else wait for it (False)."""
        end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
        if end < 0:
            if len(self.buffer) >= MAX_HEAD_BYTES:
                raise Refusal(431, "Request Header Fields Too Large", f"request head over {MAX_HEAD_BYTES} bytes")
            if self.buffer and self.state == "idle":
                self.state = "head"
                self._arm(self.guard.head_timeout_s, self._head_timeout)
            return False
        head = Head(bytes(self.buffer[: end + 4]))
        del self.buffer[: end + 4]
        key = self.guard.admin_key
        self.admin = key is not None and hmac.compare_digest(
            head.headers.get(ADMIN_HEADER, "").encode("latin-1"), key.encode()
        )
        self.model = route(head, self.admin)
        if head.length > self.guard.max_body_bytes:
            raise Refusal(
                413,
                "Payload Too Large",
                f"request body of {head.length} bytes is over the server's limit of {self.guard.max_body_bytes} "
                "bytes; send smaller batches",
            )
        json_length = head.length if head.json_length is None else head.json_length
        if self.model is not None and json_length > self.guard.max_json_bytes:
            raise Refusal(
                413,
                "Payload Too Large",
                f"JSON inference header of {json_length} bytes is over the limit of {self.guard.max_json_bytes} "
                "bytes; send binary tensors (tritonclient's default) or smaller batches",
            )
        expect = head.headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise Refusal(417, "Expectation Failed", "only 'Expect: 100-continue' is understood")
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            head.raw = head.without(b"expect")
        self.head, self.state = head, "body"
        if len(self.buffer) < head.length:  # the usual request arrives whole: no timer for it
            self._arm(self.guard.body_timeout_s, self._body_timeout)
        else:
            self._disarm()
        return True

    def _check(self, body: bytes) -> None:
        """An inference request's body against its model (Refusal 400 with the reason).  A client sends the
        same JSON header for every request of a shape; a header that passed with binary data of a length,
        and declares no BYTES input (whose check reads the data), passes again without being parsed."""
        if self.model is None:
            return
        json_length = len(body) if self.head.json_length is None else self.head.json_length
        if json_length > len(body):
            raise bad_request("Inference-Header-Content-Length is longer than the body")
        key = (self.model, self.admin, len(body) - json_length, body[:json_length])
        if key in self.guard.passed:
            return
        try:
            header = parse_json(body[:json_length])
            check_infer_request(header, body[json_length:], self.guard.models[self.model], self.admin)
        except BadRequest as exc:
            raise bad_request(str(exc)) from None
        if json_length < PASSED_HEADER_BYTES and all(entry["datatype"] != "BYTES" for entry in header["inputs"]):
            if len(self.guard.passed) >= PASSED_HEADERS:
                self.guard.passed.clear()
            self.guard.passed.add(key)

    async def _learn_then_relay(self, body: bytes) -> None:
        try:
            await self.guard.model(self.model)
            self._check(body)
        except Refusal as refusal:
            self.refuse(refusal)
            return
        if self.state == "checking":
            self.transport.resume_reading()
            self._relay(self.head.raw + body)

    def _relay(self, request: bytes) -> None:
        self.state = "upstream"
        self.guard.in_flight += 1
        upstream = self.upstream
        if upstream is not None and upstream.generation == self.guard.generation and not upstream.closed:
            upstream.send(request)
        else:
            if upstream is not None:
                upstream.transport.close()
            self.upstream = None
            self.guard.loop.create_task(self._connect_and_send(request))

    async def _connect_and_send(self, request: bytes) -> None:
        generation = self.guard.generation
        try:
            transport, upstream = await asyncio.wait_for(
                self.guard.loop.create_connection(lambda: _Upstream(self, generation), *self.guard.upstream),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, asyncio.TimeoutError):
            self.upstream_failed(None, answered=False)
            return
        if self.state != "upstream":  # the client went away meanwhile
            transport.close()
            return
        self.upstream = upstream
        upstream.send(request)

    def answered(self, keep_alive: bool) -> None:
        """Triton's answer went to the client in full."""
        self.guard.in_flight -= 1
        if not (keep_alive and self.head.keep_alive) or self.ended:
            self.state = "closing"
            self.transport.close()
            return
        self.state, self.head, self.model = "idle", None, None
        self._arm(self.guard.idle_timeout_s, self.close)
        self.transport.resume_reading()
        self._advance()

    def upstream_failed(self, upstream: _Upstream | None, answered: bool) -> None:
        """Triton's connection failed before (502, or 503 when it could not be opened) or during its answer."""
        if self.state != "upstream" or upstream is not self.upstream:
            return  # not the request in flight: a connection already replaced, or a client already gone
        self.guard.in_flight -= 1
        if answered:
            self.state = "closing"
            self.transport.close()
        elif self.upstream is None:
            self.refuse(Refusal(503, "Service Unavailable", "the server is restarting"))
        else:
            self.refuse(Refusal(502, "Bad Gateway", "the server failed during the request"))

    # -- endings --------------------------------------------------------------------------------------
    def refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal`` and end the connection: half-close, then drop what the client still sends for
        up to LINGER_S, so that it reads the answer instead of a reset."""
        self.guard.refused += 1
        self.state = "closing"
        self.buffer.clear()
        if self.transport.is_closing():
            return
        self.transport.write(refusal.response())
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self._arm(LINGER_S, self.close)

    def close(self) -> None:
        self.state = "closing"
        self.transport.close()

    def _head_timeout(self) -> None:
        self.refuse(
            Refusal(408, "Request Timeout", f"request head not complete within {self.guard.head_timeout_s:g} s")
        )

    def _body_timeout(self) -> None:
        self.refuse(Refusal(408, "Request Timeout", f"no body bytes for {self.guard.body_timeout_s:g} s"))

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self.timer = self.guard.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Upstream(asyncio.Protocol):
    """The connection to Triton of one client connection: sends its requests, copies each answer back."""

    def __init__(self, client: _Client, generation: int):
        self.client, self.generation = client, generation
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.head = bytearray()  # the answer's head while it arrives
        self.remaining: int | None = None  # bytes of the answer still to copy (None: its head is awaited)
        self.keep_alive = True
        self.started = False  # bytes of the current answer went to the client

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes) -> None:
        self.head.clear()
        self.remaining, self.started = None, False
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.remaining is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD_BYTES:
                    self.transport.close()
                return
            try:
                length, self.keep_alive = response_framing(bytes(self.head[:end]))
            except ValueError:
                self.transport.close()
                return
            data, self.remaining = bytes(self.head), end + 4 + length
            self.head.clear()
        chunk = data[: self.remaining]
        self.remaining -= len(chunk)
        self.client.transport.write(chunk)
        self.started = True
        if self.remaining == 0:
            self.remaining = None
            if not self.keep_alive:
                self.closed = True
                self.transport.close()
            self.client.answered(self.keep_alive)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.client.upstream_failed(self, answered=self.started)

    def pause_writing(self) -> None:  # Triton reads slower than the client sends
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()
