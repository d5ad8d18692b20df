"""`subgrad serve`: a real NVIDIA Triton Inference Server on a subgrad model repository.

    with TritonServer(repo, http_port=8000) as server:   # returns once every model is ready
        ...                                               # clients talk to the ports
    # stopped: SIGTERM, in-flight requests drained, then the process is gone

Which server (:func:`find_server`): a ``tritonserver`` on PATH (NVIDIA's Triton containers), which
serves the ``onnxruntime`` repository variant; otherwise the server bundled in the ``nvidia-pytriton``
wheel of the ``serve`` extra (Triton 2.51 with the python backend only), which serves the ``python``
variant.  For the bundled server this module does what its wheel leaves to the caller: the bundled
libraries on ``LD_LIBRARY_PATH``, a backend folder holding the python-backend stub built for the running
Python, and ``SUBGRAD_SITE_PACKAGES`` naming this environment's site-packages for the stub
(triton_python_model.py reads it).

Triton's HTTP port is bound to 127.0.0.1 on a free port and the public ``http_port`` is an
:class:`~subgrad.export.http_guard.HttpGuard` in front of it (that module says why); gRPC and metrics
are Triton's own.  Models are loaded explicitly, so a python-backend stub that dies is replaced by
reloading its model (:meth:`TritonServer.recover`) instead of failing every later request.

Failures before the server is ready raise :class:`ServeError` with one line saying what and how to fix
it; the server's own output goes to ``log_path``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from .http_guard import HttpGuard

STUB_NAME = "triton_python_backend_stub"
#: How long a stop waits for in-flight requests (the guard's, then Triton's own) before it forces the exit.
EXIT_TIMEOUT_S = 30.0


class ServeError(RuntimeError):
    """The server cannot be started or kept serving (the message says why and what to do)."""


@dataclass(frozen=True)
class ServerBinary:
    """A Triton Inference Server installation."""

    executable: pathlib.Path
    backend: str  # the repository variant (triton_repo.BACKENDS) MODEL.onnx is packaged as for this server
    runs_onnxruntime: bool  # whether it has Triton's onnxruntime backend (the bundled server has not)
    origin: str  # where it came from, for messages
    library_path: pathlib.Path | None = None  # prepended to LD_LIBRARY_PATH
    python_backend: pathlib.Path | None = None  # folder with libtriton_python.so, when not the server's default
    stub: pathlib.Path | None = None  # the python-backend stub for this Python


def find_server() -> ServerBinary:
    """``tritonserver`` on PATH, else the ``serve`` extra's bundled server, else a ServeError saying how."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(pathlib.Path(on_path), "onnxruntime", True, f"{on_path} (on PATH)")
    try:
        import pytriton
    except ImportError:
        raise ServeError(
            "no Triton Inference Server found: pip install 'subgrad[cpu,serve]' (a bundled server "
            "with the python backend), or run inside NVIDIA's Triton container (tritonserver on "
            "PATH)"
        ) from None
    root = pathlib.Path(pytriton.__file__).resolve().parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no python-backend stub for Python {version}; use Python 3.8-3.13")
    return ServerBinary(
        root / "tritonserver" / "bin" / "tritonserver",
        "python",
        False,
        "the serve extra (nvidia-pytriton)",
        library_path=root.parent / "nvidia_pytriton.libs",
        python_backend=root / "tritonserver" / "backends" / "python",
        stub=stub,
    )


def repository_models(repository: pathlib.Path) -> dict[str, str]:
    """{model name: "onnxruntime" | "python"} of every model folder in a repository."""
    models = {}
    for config in sorted(pathlib.Path(repository).glob("*/config.pbtxt")):
        text = config.read_text()
        models[config.parent.name] = "python" if 'backend: "python"' in text else "onnxruntime"
    return models


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _last_error(log_path: pathlib.Path) -> str:
    """The server log's most telling line: a failed model load, else the last error line."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    failed = [line for line in lines if "failed to load" in line]
    errors = [line for line in lines if re.match(r"E\d{4} ", line) or line.startswith("error:")]
    if failed or errors:  # Triton's error lines start with E and the date (E1202 16:49:54.96 ...)
        line = failed[0] if failed else errors[-1]
        return line.split("] ", 1)[-1].strip().strip('"').split("\\n")[0][:300]
    return "no error in its log"


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
    ):
        self.repository = pathlib.Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
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
        self._internal_http_port = 0
        self._workdir: pathlib.Path | None = None
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
            if port_in_use(port):
                raise ServeError(f"port {port} is in use; pass {flag} with a free port")
        self._internal_http_port = free_port()
        self._workdir = pathlib.Path(tempfile.mkdtemp(prefix="subgrad-serve-"))
        command = [
            str(self.server.executable),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--http-address=127.0.0.1",
            f"--http-port={self._internal_http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--log-info=true",
            f"--exit-timeout-secs={int(EXIT_TIMEOUT_S)}",
        ]
        env = dict(os.environ)
        if self.server.python_backend is not None:
            backend = self._workdir / "backends" / "python"
            backend.mkdir(parents=True)
            for entry in self.server.python_backend.iterdir():
                (backend / entry.name).symlink_to(entry)
            shutil.copy(self.server.stub, backend / STUB_NAME)
            command.append(f"--backend-directory={backend.parent}")
        if self.server.library_path is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [str(self.server.library_path), env.get("LD_LIBRARY_PATH")])
            )
        env["SUBGRAD_SITE_PACKAGES"] = os.pathsep.join(site.getsitepackages())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # own session: a terminal's Ctrl-C reaches `subgrad serve`, which drains and stops the server
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_ready()
            self.guard = HttpGuard(self.http_port, self._internal_http_port).start()
        except BaseException:
            self.stop()
            raise
        self._stubs = self._stub_pids()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(
                    f"the Triton server exited before it was ready ({_last_error(self.log_path)}); "
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
        request = urllib.request.Request(f"http://127.0.0.1:{self._internal_http_port}{path}", method=method)
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

    def dead_stubs(self) -> dict[int, str]:
        """{pid: model} of stubs that were running at the last check and are gone now."""
        alive = self._stub_pids()
        dead = {pid: model for pid, model in self._stubs.items() if pid not in alive}
        self._stubs = alive
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
