"""`subgrad serve`: a real NVIDIA Triton Inference Server on a subgrad model repository.

    with TritonServer(repo, http_port=8000) as server:   # returns once every model is ready
        ...                                               # clients talk to the ports
    # stopped: SIGTERM, in-flight requests drained, then the process is gone

Which server (:func:`find_server`): a ``tritonserver`` on PATH (NVIDIA's Triton containers), which
serves the ``onnxruntime`` repository variant; otherwise the server bundled in the ``nvidia-pytriton``
wheel of the ``serve`` extra (Triton 2.51 with the python backend only), which serves the ``python``
variant.  For the bundled server this module does what its wheel leaves to the caller: the libraries on
``LD_LIBRARY_PATH``, a backend folder with the python-backend stub built for the running Python, and
``SUBGRAD_SITE_PACKAGES`` naming this environment's site-packages (triton_python_model.py reads it).

What clients reach (docs/deploy.md, "Security"): ``host`` (default 127.0.0.1) for the public HTTP port,
gRPC and metrics.  Triton's own HTTP port is bound to 127.0.0.1 on a free port, behind an
:class:`~subgrad.export.http_guard.HttpGuard` on the public port (that module says why).  Models are
loaded in explicit mode, so a python-backend stub that dies is replaced by reloading its model
(:meth:`TritonServer.recover`) in seconds, without dropping the other models or the gRPC port; the
model-repository API that mode opens, and shared memory, trace and logging, are restricted on both
protocols to requests carrying ``admin_key`` (Triton's ``--http-restricted-api`` /
``--grpc-restricted-protocol``; HTTP 403, gRPC UNAVAILABLE without it).  A server that dies is started
again by :func:`serve_until`, a bounded number of times.

Failures before the server is ready raise :class:`ServeError` with one line saying what and how to fix
it; the server's own output goes to ``log_path``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import site
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from .http_framing import ADMIN_HEADER
from .http_guard import HttpGuard
from .infer_check import ModelSpec
from .triton_install import STUB_NAME, ServeError, ServerBinary, find_server, repository_models

#: How long a stop waits for in-flight requests (the guard's, then Triton's own) before it forces the exit.
EXIT_TIMEOUT_S = 30.0
#: Where the ports listen unless the user says otherwise: this machine's clients only.
DEFAULT_HOST = "127.0.0.1"
#: Triton's API groups that need the admin key: loading code, reading host memory, writing files.
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
#: The environment variable a user sets to hold the admin key (else each start draws one nobody sees).
ADMIN_KEY_ENV = "SUBGRAD_ADMIN_KEY"
#: gRPC metadata key of the admin key: Triton prefixes a restricted protocol's key with this.
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
#: A server that dies is started again at most this many times within RESTART_WINDOW_S, waiting 1, 2,
#: 4, ... s first; past that `subgrad serve` exits 1 for its supervisor (systemd, Kubernetes) to act.
RESTARTS = 3
RESTART_WINDOW_S = 600.0


def port_in_use(port: int, host: str = DEFAULT_HOST) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_key_from_env() -> str | None:
    """The admin key the user chose in ``SUBGRAD_ADMIN_KEY`` (None when unset); ServeError when weak."""
    key = os.environ.get(ADMIN_KEY_ENV)
    if key is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,256}", key):
        raise ServeError(
            f"{ADMIN_KEY_ENV} must be 16 to 256 letters, digits or '._~-' (for example: "
            'python -c "import secrets; print(secrets.token_urlsafe(32))")'
        )
    return key


def _log_errors(text: str) -> list[str]:
    """The lines of a server log that tell what failed: failed model loads, then Triton's error lines."""
    lines = text.splitlines()
    failed = [line for line in lines if "failed to load" in line]
    # Triton's error lines start with E and the date (E1202 16:49:54.96 ...)
    return failed + [line for line in lines if re.match(r"E\d{4} ", line) or line.startswith("error:")]


def _last_error(log_path: pathlib.Path, offset: int = 0) -> str:
    """The server log's most telling line since ``offset``: a failed model load, else the last error line."""
    text = log_path.read_bytes()[offset:].decode(errors="replace") if log_path.exists() else ""
    errors = _log_errors(text)
    if errors:
        line = errors[0] if "failed to load" in errors[0] else errors[-1]
        return line.split("] ", 1)[-1].strip().strip('"').split("\\n")[0][:300]
    return "no error in its log"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class TritonServer:
    """A tritonserver process serving ``repository``; see the module docstring."""

    def __init__(
        self,
        repository,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_path=None,
        server: ServerBinary | None = None,
        startup_timeout_s: float = 120.0,
        host: str = DEFAULT_HOST,
        admin_key: str | None = None,
    ):
        self.repository = pathlib.Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.admin_key = admin_key or secrets.token_urlsafe(32)
        self.server = server
        self.log_path = (
            pathlib.Path(log_path)
            if log_path
            else pathlib.Path(tempfile.gettempdir()) / f"subgrad-serve-{os.getpid()}.log"
        )
        self.startup_timeout_s = startup_timeout_s
        self.models: dict[str, str] = {}
        self.process: subprocess.Popen | None = None
        self.guard: HttpGuard | None = None
        self.version = "?"
        self.starts = 0  # processes started (1 + restarts)
        self._internal_http_port = 0
        self._log_offset = 0  # where the running process's lines start in the log
        self._workdir: pathlib.Path | None = None
        self._env: dict[str, str] = {}
        self._stubs: dict[int, str] = {}  # stub pid -> model name

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        self.server = self.server or find_server()
        self.models = repository_models(self.repository)
        if not self.models:
            raise ServeError(
                f"{self.repository} holds no model (no */config.pbtxt); write one with "
                "`subgrad package MODEL.onnx --triton-repo DIR`"
            )
        for name, backend in self.models.items():
            if backend == "onnxruntime" and not self.server.runs_onnxruntime:
                raise ServeError(
                    f"model {name!r} uses the onnxruntime backend, which the server of the serve "
                    "extra lacks; package it with --backend python, or serve this repository with "
                    "NVIDIA's tritonserver"
                )
        for flag, port in (
            ("--http-port", self.http_port),
            ("--grpc-port", self.grpc_port),
            ("--metrics-port", self.metrics_port),
        ):
            if port_in_use(port, self.host):
                raise ServeError(f"port {port} is in use on {self.host}; pass {flag} with a free port")
        self._workdir = pathlib.Path(tempfile.mkdtemp(prefix="subgrad-serve-"))
        self._env = dict(os.environ)
        if self.server.python_backend is not None:
            backend = self._workdir / "backends" / "python"
            backend.mkdir(parents=True)
            for entry in self.server.python_backend.iterdir():
                (backend / entry.name).symlink_to(entry)
            shutil.copy(self.server.stub, backend / STUB_NAME)
        if self.server.library_path is not None:
            self._env["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [str(self.server.library_path), self._env.get("LD_LIBRARY_PATH")])
            )
        self._env["SUBGRAD_SITE_PACKAGES"] = os.pathsep.join(site.getsitepackages())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        try:
            self._launch()
            specs = {
                name: ModelSpec.from_config(json.loads(self._get(f"/v2/models/{name}/config")[1]))
                for name in self.models
            }
            self.guard = HttpGuard(
                self.http_port, self._internal_http_port, self.host, models=specs, admin_key=self.admin_key
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self) -> list[str]:
        restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}"
        command = [
            str(self.server.executable),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--http-address=127.0.0.1",
            f"--http-port={self._internal_http_port}",
            f"--http-restricted-api={restricted}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--grpc-restricted-protocol={restricted}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--log-info=true",
            f"--exit-timeout-secs={int(EXIT_TIMEOUT_S)}",
        ]
        if self.server.python_backend is not None:
            command.append(f"--backend-directory={self._workdir / 'backends'}")
        return command

    def _launch(self) -> None:
        """Start a tritonserver process (its output appended to the log) and wait until every model is ready."""
        self._internal_http_port = free_port()
        self._log_offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            # own session: a terminal's Ctrl-C reaches `subgrad serve`, which drains and stops the server
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True
            )
        self.starts += 1
        self._wait_ready()
        self._stubs = self._stub_pids()

    def restart(self) -> None:
        """Start the server again after its process ended; the HTTP front relays to the new one."""
        if self.exit_status() is None:
            raise ServeError("restart() is for a server whose process has ended")
        self._launch()
        if self.guard is not None:
            self.guard.retarget(self._internal_http_port)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(
                    f"the Triton server exited before it was ready ({_last_error(self.log_path, self._log_offset)}); "
                    f"its log: {self.log_path}"
                )
            try:
                if all(self._get(f"/v2/models/{name}/ready")[0] == 200 for name in self.models):
                    self.version = json.loads(self._get("/v2")[1]).get("version", "?")
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise ServeError(
            f"the Triton server was not ready after {self.startup_timeout_s:.0f} s; its log: {self.log_path}"
        )

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S) -> int | None:
        """Drain and stop: the HTTP front stops taking requests and finishes those in flight, then SIGTERM
        (Triton finishes its own in-flight gRPC requests), SIGKILL after ``timeout_s`` more; the exit status."""
        if self.guard is not None:
            self.guard.stop(timeout_s)
            self.guard = None
        status = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s + 5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            status = self.process.returncode
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return status

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- health ---------------------------------------------------------------------------------------
    def _get(self, path: str, method: str = "GET", timeout_s: float = 5.0) -> tuple[int, bytes]:
        """A request to Triton's own HTTP port, with the admin key."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self._internal_http_port}{path}", method=method, headers={ADMIN_HEADER: self.admin_key}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _stub_pids(self) -> dict[int, str]:
        """{pid: model name} of the python-backend stubs the server runs (children, found in /proc)."""
        stubs = {}
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == self.process.pid and args[0].endswith(STUB_NAME.encode()) and len(args) > 1:
                stubs[int(entry.name)] = pathlib.Path(args[1].decode()).parent.parent.name
        return stubs

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def last_log_lines(self, count: int = 5) -> list[str]:
        """The last ``count`` lines the running (or last) process wrote to the log."""
        text = self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")
        return [line for line in text.splitlines() if line.strip()][-count:]

    def dead_stubs(self) -> dict[int, str]:
        """{pid: model} of stubs that were running at the last check and are gone now (exited or zombie).
        Reads one /proc file per known stub: it runs every 0.2 s beside the HTTP front, which shares this
        process's interpreter."""
        dead = {pid: model for pid, model in self._stubs.items() if not _running(pid)}
        for pid in dead:
            del self._stubs[pid]
        return dead

    def recover(self, model: str) -> bool:
        """Reload ``model`` (new stubs); True when it is ready again."""
        status, _ = self._get(f"/v2/repository/models/{model}/load", method="POST", timeout_s=self.startup_timeout_s)
        self._stubs = self._stub_pids()
        return status == 200 and self._get(f"/v2/models/{model}/ready")[0] == 200

    def resident_bytes(self) -> int:
        """Resident memory of the server and its stubs (VmRSS from /proc)."""
        total = 0
        for pid in [self.process.pid, *self._stub_pids()]:
            try:
                for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total


def serve_until(triton: TritonServer, stopping, say, restarts: int = RESTARTS) -> int:
    """Keep ``triton`` serving until ``stopping()`` is true: reload a model whose stub died, start the
    server again when it dies (at most ``restarts`` times within RESTART_WINDOW_S, after 1, 2, 4, ... s).
    ``say(line)`` reports each event.  0 when stopped as asked, 1 when the server stayed down."""
    recent: list[float] = []  # times of the restarts within the window
    while not stopping():
        time.sleep(0.2)
        status = triton.exit_status()
        if status is not None:
            now = time.monotonic()
            recent = [t for t in recent if now - t < RESTART_WINDOW_S]
            last = " | ".join(triton.last_log_lines())
            if len(recent) >= restarts:
                say(
                    f"the Triton server exited with status {status} after {len(recent)} restarts within "
                    f"{RESTART_WINDOW_S:.0f} s (--restarts {restarts}); giving up (its log: {triton.log_path}; "
                    f"last lines: {last})"
                )
                return 1
            delay = 2.0 ** len(recent)
            say(f"the Triton server exited with status {status}; restarting in {delay:.0f} s (last log lines: {last})")
            recent.append(now)
            time.sleep(delay)
            if stopping():
                break
            try:
                triton.restart()
            except ServeError as exc:
                say(f"the restart failed: {exc}")
                continue
            say(f"the Triton server is serving again (start {triton.starts})")
            continue
        for pid, model in triton.dead_stubs().items():
            say(
                f"the python-backend stub of {model!r} (pid {pid}) died; its requests failed with "
                "'Stub process is not healthy'; reloading the model"
            )
            ok = triton.recover(model)
            say(f"{model!r} " + ("is ready again" if ok else f"did not come back; its log: {triton.log_path}"))
    return 0
