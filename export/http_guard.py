"""A bounded HTTP front for Triton Inference Server: what reaches the server is a request it survives.

Triton 2.51's HTTP frontend (the server in the ``serve`` extra) dies with SIGSEGV on a JSON request body
of a few MB, valid or not, and on a binary-tensor body longer than its header declares (measured on the
2-core VM: a 2 MiB body of junk gets a 500, a 4 MiB one kills the server; upstream issue
triton-inference-server/server#5840).  ``subgrad serve`` therefore binds Triton's HTTP port to
127.0.0.1 and puts this relay on the public port.  Per request it reads only the head and the body's
framing, and answers itself, with a JSON ``{"error": ...}`` as Triton does:

* 413 when the body is over ``max_body_bytes`` (:data:`MAX_BODY_BYTES`), or a JSON body (no
  ``Inference-Header-Content-Length``) is over ``max_json_bytes`` (:data:`MAX_JSON_BYTES`);
* 400 when a binary-tensor body's length is not its JSON header plus the ``binary_data_size`` of
  its inputs, or that header is not JSON;
* 411 for a chunked body (Triton needs ``Content-Length``), 431 for a head over 64 KiB.

Everything else, every endpoint and method, is relayed byte for byte over one upstream connection per
client connection (keep-alive both ways).  The gRPC port needs no front: gRPC's framing bounds messages
and Triton answers an oversized one with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import json
import threading

#: Largest request body relayed.  The largest valid request of a packaged model is far smaller (a batch
#: of 256 LeNet inputs as binary float32 is 3 MiB); larger bodies are refused before Triton reads them.
MAX_BODY_BYTES = 32 << 20
#: Largest JSON-encoded body relayed (Triton's JSON parser is what crashes; see the module docstring).
#: A batch of 8 CIFAR-10 images as JSON numbers is about 0.3 MB; send larger batches as binary tensors.
MAX_JSON_BYTES = 1 << 20
MAX_HEAD_BYTES = 64 << 10
_READ_CHUNK = 1 << 20


class Refusal(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


def check_request(method: str, headers: dict[str, str], length: int, max_body_bytes: int, max_json_bytes: int) -> None:
    """Refuse (raise :class:`Refusal`) what the head alone shows Triton must not read."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise Refusal(411, "Length Required", "chunked request bodies are not accepted; send Content-Length")
    if length > max_body_bytes:
        raise Refusal(
            413,
            "Payload Too Large",
            f"request body of {length} bytes is over the server's limit of "
            f"{max_body_bytes} bytes; send smaller batches",
        )
    if method == "POST" and "inference-header-content-length" not in headers and length > max_json_bytes:
        raise Refusal(
            413,
            "Payload Too Large",
            f"JSON request body of {length} bytes is over the limit of "
            f"{max_json_bytes} bytes; send binary tensors (tritonclient's "
            "default) or smaller batches",
        )


def check_binary_body(headers: dict[str, str], body: bytes) -> None:
    """A binary-tensor body must be its JSON header followed by exactly the inputs' declared bytes."""
    field = headers.get("inference-header-content-length")
    if field is None:
        return
    try:
        header_length = int(field)
        if not 0 <= header_length <= len(body):
            raise ValueError
        header = json.loads(body[:header_length])
        declared = sum(
            int(entry.get("parameters", {}).get("binary_data_size", 0)) for entry in header.get("inputs", [])
        )
    except (ValueError, TypeError, AttributeError):
        raise Refusal(
            400,
            "Bad Request",
            "Inference-Header-Content-Length does not frame a JSON inference header at the start of the body",
        ) from None
    if header_length + declared != len(body):
        raise Refusal(
            400,
            "Bad Request",
            f"binary request body is {len(body)} bytes but its header "
            f"({header_length} bytes) declares {declared} bytes of tensor data",
        )


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return method, headers


def _without(head: bytes, name: bytes) -> bytes:
    """The head with every ``name:`` header line removed (``name`` lower-case)."""
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":"))


def _refusal_response(refusal: Refusal) -> bytes:
    body = json.dumps({"error": str(refusal)}).encode()
    return (
        f"HTTP/1.1 {refusal.status} {refusal.reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def _copy_body(reader: asyncio.StreamReader, length: int, write=None) -> bool:
    """Read ``length`` body bytes in chunks, passing each to ``write`` (None: drop them, so a client whose
    body was refused reads our answer, not a reset); False when the connection ended first."""
    while length > 0:
        chunk = await reader.read(min(length, _READ_CHUNK))
        if not chunk:
            return False
        if write is not None:
            write(chunk)
        length -= len(chunk)
    return True


async def _relay_response(upstream: asyncio.StreamReader, client: asyncio.StreamWriter) -> bool:
    """Copy one upstream response to the client; False when the upstream connection is finished."""
    head = await upstream.readuntil(b"\r\n\r\n")
    _, headers = _parse_head(head)
    client.write(head)
    if not await _copy_body(upstream, int(headers.get("content-length", "0")), client.write):
        return False
    await client.drain()
    return headers.get("connection", "").lower() != "close"


class HttpGuard:
    """Relay ``listen_host:listen_port`` -> ``upstream_host:upstream_port`` in a daemon thread, refusing
    what Triton's HTTP frontend would die of (module docstring).  ``start()`` returns once listening."""

    def __init__(
        self,
        listen_port: int,
        upstream_port: int,
        listen_host: str = "0.0.0.0",
        upstream_host: str = "127.0.0.1",
        max_body_bytes: int = MAX_BODY_BYTES,
        max_json_bytes: int = MAX_JSON_BYTES,
    ):
        self.listen = (listen_host, listen_port)
        self.upstream = (upstream_host, upstream_port)
        self.max_body_bytes, self.max_json_bytes = max_body_bytes, max_json_bytes
        self.refused = 0  # requests answered by the guard itself
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()  # open client and upstream connections
        self._in_flight = 0  # requests relayed upstream and not yet answered

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

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_w = None
        self._writers.add(client_w)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream_w)
            while True:
                try:
                    head = await client_r.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    client_w.write(
                        _refusal_response(
                            Refusal(431, "Request Header Fields Too Large", f"request head over {MAX_HEAD_BYTES} bytes")
                        )
                    )
                    await client_w.drain()
                    return
                method, headers = _parse_head(head)
                length = int(headers.get("content-length", "0") or 0)
                expects_continue = headers.get("expect", "").lower() == "100-continue"
                body = None
                try:
                    check_request(method, headers, length, self.max_body_bytes, self.max_json_bytes)
                    if expects_continue:
                        client_w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        head = _without(head[:-4], b"expect") + b"\r\n\r\n"
                    body = await client_r.readexactly(length)
                    check_binary_body(headers, body)
                except Refusal as refusal:
                    self.refused += 1
                    client_w.write(_refusal_response(refusal))
                    await client_w.drain()
                    if body is None and not expects_continue:  # the client sends it whatever we say
                        await _copy_body(client_r, length)
                    return
                self._in_flight += 1
                try:
                    upstream_w.write(head + body)
                    await upstream_w.drain()
                    keep_open = await _relay_response(upstream_r, client_w)
                finally:
                    self._in_flight -= 1
                if not keep_open:
                    return
                if headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return  # the client went away or sent a malformed head: nothing to answer
        finally:
            for writer in (client_w, upstream_w):
                if writer is not None:
                    writer.close()
                    self._writers.discard(writer)
