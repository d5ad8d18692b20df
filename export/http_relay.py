"""The connections of subgrad's HTTP front (http_guard.py): a client connection as a state machine over its
bytes, and its connection to Triton.  asyncio protocols rather than streams: a request costs a head
parse, the checks and two socket writes, which keeps the hop the front adds near a C relay's
(benchmarks/serve.py).  What is refused and why: http_guard.py's docstring.
"""

from __future__ import annotations

import asyncio
import hmac

from .http_framing import ADMIN_HEADER, Head, Refusal, bad_request, response_framing, route
from .infer_check import BadRequest, check_infer_request, parse_json

MAX_HEAD_BYTES = 64 << 10
LINGER_S = 5.0  # after a refusal, how long what the client still sends is read and dropped before closing
CONNECT_TIMEOUT_S = 5.0  # opening a connection to Triton
PASSED_HEADERS = 1024  # JSON headers remembered as checked (ClientConnection._check), each under PASSED_HEADER_BYTES
PASSED_HEADER_BYTES = 4096


class ClientConnection(asyncio.Protocol):
    """One client connection: a state machine over its bytes.  States: ``idle`` (between requests),
    ``head`` (a head has begun), ``body``, ``checking`` (a model's spec is being learnt), ``upstream``
    (relayed, waiting for Triton's answer), ``closing`` (answered by the front; dropping what arrives)."""

    def __init__(self, guard):  # an HttpGuard: its settings, models and counters
        self.guard = guard
        self.buffer = bytearray()
        self.state = "idle"
        self.head: Head | None = None
        self.model: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.upstream: UpstreamConnection | None = None
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
                self.guard.loop.create_connection(lambda: UpstreamConnection(self, generation), *self.guard.upstream),
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

    def upstream_failed(self, upstream: UpstreamConnection | None, answered: bool) -> None:
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


class UpstreamConnection(asyncio.Protocol):
    """The connection to Triton of one client connection: sends its requests, copies each answer back."""

    def __init__(self, client: ClientConnection, generation: int):
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
