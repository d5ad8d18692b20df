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
ways), by the connections of http_relay.py.  gRPC needs no front: gRPC's framing bounds messages and
Triton checks them (tests/test_serve_attack.py fuzzes both).
"""

from __future__ import annotations

import asyncio
import json
import threading

from .http_framing import Refusal
from .http_relay import CONNECT_TIMEOUT_S, ClientConnection
from .infer_check import ModelSpec

#: Largest request body relayed.  A batch of 256 LeNet inputs as binary float32 is 3 MiB.
MAX_BODY_BYTES = 32 << 20
#: Largest JSON inference header (a whole JSON body, or the JSON part of a binary one): Triton's JSON
#: parser is what crashes.  A batch of 8 CIFAR-10 images as JSON numbers is about 0.3 MB.
MAX_JSON_BYTES = 1 << 20
MAX_CONNECTIONS = 256
HEAD_TIMEOUT_S = 10.0  # from a request's first byte to the end of its head
IDLE_TIMEOUT_S = 60.0  # a keep-alive connection waiting for its next request
BODY_TIMEOUT_S = 30.0  # longest wait for the next bytes of a body


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
        self.clients: set[ClientConnection] = set()
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
                        lambda: ClientConnection(self), *self.listen, reuse_address=True, backlog=self.max_connections
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
