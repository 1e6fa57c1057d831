"""Soak: valid and garbage traffic against ``tensafe up`` for minutes; do RSS and fds level off?

The bench starts a :class:`~tensafe.client.stack.LocalStack` (every service its own
process on loopback, embedded NATS, SQLite unless ``--database-url``) with the tiny
model, creates a tenant and one DP training client, then runs two client threads until
``--minutes`` have passed or ``--max-calls`` calls were made (whichever is first; it
stops by itself):

  valid    a weighted mix: one DP training step (ForwardBackward + OptimStep, waited
           for), ListTrainingClients, GetPrivacySpent, ListAdapters, GetSession of an
           unknown id (NOT_FOUND), CompilePlan, ListFutures;
  garbage  every unary RPC of every service (enumerated from the generated protos) with
           random bytes, a message whose string fields hold NUL, control characters or
           long text, no token, a forged token or the tenant's token.

A sampler thread reads every stack process's resident memory (``VmRSS``) and open file
descriptors (``/proc/<pid>/fd``) every ``--sample-seconds``. After the warm-up
(``--warmup-minutes``), the growth of each process is the median of its last three
samples minus the median of its first three; the bench fails (exit 1) if any process
grows more than ``--max-rss-growth-mib`` or ``--max-fd-growth``, or any call answered
INTERNAL, UNKNOWN or DATA_LOSS. It prints the curve (one row per minute per process),
the growth table and the status counts.

Run: ``python bench/soak.py [--minutes 10] [--warmup-minutes 2] [--sample-seconds 10]``.
The machine's load average is printed before and after (figures on a shared machine
are noisy).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import os
import pkgutil
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

import tensafe.proto
from tensafe.client.auth import TokenProvider
from tensafe.client.connection import load_connection
from tensafe.client.demo import create_tenant
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model
from tensafe.client.train_cli import to_datum
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.he.v1 import he_service_pb2 as he_pb
from tensafe.proto.he.v1 import he_service_pb2_grpc
from tensafe.proto.registry.v1 import registry_service_pb2 as registry_pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as trainer_pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.tinker import ServiceClient, types

BASE_MODEL = "tiny-llama"
CRASH_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
SERVICE_OF_PACKAGE = {
    "tensafe.auth.v1": "auth",
    "tensafe.trainer.v1": "trainer",
    "tensafe.registry.v1": "registry",
    "tensafe.he.v1": "he_runtime",
    "tensafe.common.v1": "trainer",
}
NASTY_TEXT = ["", "\x00", "a\x00b", "\n\r\t", "\x1b[31m", "é中🙂", "x" * 300, "../../etc/passwd"]


@dataclasses.dataclass
class Sample:
    """One reading of one process."""

    at: float
    rss_bytes: int
    fds: int


def read_process(pid: int) -> tuple[int, int] | None:
    """(resident bytes, open fds) of ``pid``, or ``None`` when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024, fds
    return None


def stack_processes(data_dir: Path) -> dict[str, int]:
    """Name → pid of every process of the stack: services, worker, nats-server."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\x00")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != os.getpid():
            continue
        text = [part.decode(errors="replace") for part in command if part]
        if "-m" in text:
            module = text[text.index("-m") + 1]
            if module.startswith("tensafe."):
                found[module.removeprefix("tensafe.")] = int(entry.name)
        elif text and "nats-server" in text[0]:
            found["nats-server"] = int(entry.name)
    return found


class Counts:
    """Status codes per traffic kind (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.crashes: list[str] = []

    def add(self, kind: str, code: str, detail: str = "") -> None:
        with self._lock:
            self.by_kind[kind][code] += 1
            if code in CRASH_CODES and len(self.crashes) < 20:
                self.crashes.append(f"{kind}: {code} {detail[:200]}")

    def total(self) -> int:
        with self._lock:
            return sum(sum(c.values()) for c in self.by_kind.values())


def code_of(call: Callable[[], Any]) -> tuple[str, str]:
    """Run a call; its status code name and details."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""  # type: ignore[attr-defined]
    return "OK", ""


def unary_methods() -> list[MethodDescriptor]:
    """Every unary-unary RPC of every generated TenSafe service."""
    methods = []
    for module in pkgutil.walk_packages(tensafe.proto.__path__, "tensafe.proto."):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(module.name).DESCRIPTOR
            for service in descriptor.services_by_name.values():
                methods += [
                    m for m in service.methods if not m.client_streaming and not m.server_streaming
                ]
    return methods


def nasty_message(method: MethodDescriptor, rng: random.Random) -> bytes:
    """The method's request with every top-level scalar field set to a bad value."""
    request: Message = message_factory.GetMessageClass(method.input_type)()
    for field in method.input_type.fields:
        if field.is_repeated or field.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(request, field.name, rng.choice(NASTY_TEXT))
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(request, field.name, rng.randbytes(rng.randrange(0, 64)))
        elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
            setattr(request, field.name, rng.choice([0, -1, 2**31 - 1]))
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(request, field.name, rng.random() < 0.5)
    return request.SerializeToString()


class Traffic:
    """The two client threads' work, sharing a deadline and a call budget."""

    def __init__(
        self, connection_file: Path, api_key: str, deadline: float, max_calls: int, seed: int
    ) -> None:
        self.connection = load_connection(connection_file)
        self.channels = {name: self.connection.channel(name) for name in self.connection.services}
        self.tokens = TokenProvider(self.channels["auth"], api_key)
        self.connection_file = connection_file
        self.api_key = api_key
        self.deadline = deadline
        self.max_calls = max_calls
        self.counts = Counts()
        self.seed = seed

    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.counts.total() < self.max_calls

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens.token()}"),)

    def valid(self) -> None:
        rng = random.Random(self.seed)
        trainer = trainer_service_pb2_grpc.TrainerServiceStub(self.channels["trainer"])
        futures = common_pb2_grpc.FutureServiceStub(self.channels["trainer"])
        registry = registry_service_pb2_grpc.RegistryServiceStub(self.channels["registry"])
        he = he_service_pb2_grpc.HeRuntimeServiceStub(self.channels["he_runtime"])
        spec = he_pb.PlanSpec(
            hidden_size=64,
            output_size=64,
            rank=2,
            alpha=4.0,
            tokens=1,
            parameters=he_pb.CkksParameters(
                poly_modulus_degree=8192, coeff_modulus_bits=[60, 40, 40, 60], scale_bits=40
            ),
        )
        with ServiceClient(api_key=self.api_key, connection_file=self.connection_file) as svc:
            client = svc.create_lora_training_client(
                base_model=BASE_MODEL, rank=2, lora_alpha=4.0, dp_noise_multiplier=1.0
            )
            client_id = str(client.model_id)

            def train() -> None:
                tokens = [rng.randrange(1, 200) for _ in range(8)]
                client.forward_backward([to_datum(tokens)], "cross_entropy").result()
                client.optim_step(types.AdamParams(learning_rate=1e-3)).result()

            operations: list[tuple[str, int, Callable[[], Any]]] = [
                ("train_step", 1, train),
                (
                    "list_clients",
                    3,
                    lambda: trainer.ListTrainingClients(
                        trainer_pb.ListTrainingClientsRequest(), metadata=self.metadata()
                    ),
                ),
                (
                    "privacy_spent",
                    2,
                    lambda: trainer.GetPrivacySpent(
                        trainer_pb.GetPrivacySpentRequest(training_client_id=client_id),
                        metadata=self.metadata(),
                    ),
                ),
                (
                    "list_adapters",
                    3,
                    lambda: registry.ListAdapters(
                        registry_pb.ListAdaptersRequest(), metadata=self.metadata()
                    ),
                ),
                (
                    "unknown_session",
                    2,
                    lambda: he.GetSession(
                        he_pb.GetSessionRequest(session_id="no-such-session"),
                        metadata=self.metadata(),
                    ),
                ),
                (
                    "compile_plan",
                    1,
                    lambda: he.CompilePlan(
                        he_pb.CompilePlanRequest(spec=spec), metadata=self.metadata()
                    ),
                ),
                (
                    "list_futures",
                    2,
                    lambda: futures.ListFutures(
                        common_pb2.ListFuturesRequest(page_size=10), metadata=self.metadata()
                    ),
                ),
            ]
            names = [name for name, _, _ in operations]
            weights = [weight for _, weight, _ in operations]
            by_name = {name: function for name, _, function in operations}
            while self.running():
                name = rng.choices(names, weights)[0]
                code, detail = code_of(by_name[name])
                self.counts.add(f"valid:{name}", code, detail)

    def garbage(self) -> None:
        rng = random.Random(self.seed + 1)
        methods = unary_methods()
        while self.running():
            method = rng.choice(methods)
            package = method.containing_service.file.package
            channel = self.channels[SERVICE_OF_PACKAGE[package]]
            path = f"/{method.containing_service.full_name}/{method.name}"
            call = channel.unary_unary(
                path,
                request_serializer=lambda raw: raw,
                response_deserializer=lambda raw: raw,
            )
            payload = (
                rng.randbytes(rng.randrange(1, 128))
                if rng.random() < 0.3
                else nasty_message(method, rng)
            )
            credentials = rng.choice(["token", "token", "none", "forged"])
            metadata: tuple[tuple[str, str], ...] = ()
            if credentials == "token":
                metadata = self.metadata()
            elif credentials == "forged":
                metadata = (("authorization", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0."),)
            code, detail = code_of(
                lambda c=call, p=payload, m=metadata: c(p, metadata=m, timeout=30)
            )
            self.counts.add("garbage", code, detail)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def sampler(
    processes: dict[str, int],
    samples: dict[str, list[Sample]],
    stop: threading.Event,
    interval: float,
    started: float,
) -> None:
    """Read every process every ``interval`` seconds until ``stop``."""
    while True:
        now = time.monotonic() - started
        for name, pid in processes.items():
            reading = read_process(pid)
            if reading is not None:
                samples[name].append(Sample(now, *reading))
        if stop.wait(interval):
            return


def report(
    samples: dict[str, list[Sample]], warmup: float, max_rss_mib: float, max_fds: int
) -> bool:
    """Print the curve and the growth table; whether every process is within bounds."""
    names = sorted(samples)
    print("\nCurve (RSS MiB / open fds at each whole minute):")
    print(f"{'minute':>6} " + " ".join(f"{name:>22}" for name in names))
    last_minute = int(max(s.at for series in samples.values() for s in series) // 60)
    for minute in range(last_minute + 1):
        row = []
        for name in names:
            near = [s for s in samples[name] if minute * 60 <= s.at < (minute + 1) * 60]
            row.append(
                f"{near[0].rss_bytes / 2**20:>14.1f} / {near[0].fds:>4}" if near else " " * 22
            )
        print(f"{minute:>6} " + " ".join(f"{cell:>22}" for cell in row))
    print(
        f"\nGrowth after the {warmup / 60:.1f}-minute warm-up "
        f"(median of the last 3 samples - median of the first 3):"
    )
    print(f"{'process':>16} {'RSS start':>10} {'RSS end':>9} {'growth':>8} {'fds':>9} {'ok':>4}")
    healthy = True
    for name in names:
        after = [s for s in samples[name] if s.at >= warmup]
        if len(after) < 6:
            print(f"{name:>16} too few samples after the warm-up ({len(after)})")
            healthy = False
            continue
        start_rss = statistics.median(s.rss_bytes for s in after[:3]) / 2**20
        end_rss = statistics.median(s.rss_bytes for s in after[-3:]) / 2**20
        start_fds = statistics.median(s.fds for s in after[:3])
        end_fds = statistics.median(s.fds for s in after[-3:])
        ok = end_rss - start_rss <= max_rss_mib and end_fds - start_fds <= max_fds
        healthy &= ok
        print(
            f"{name:>16} {start_rss:>9.1f}M {end_rss:>8.1f}M {end_rss - start_rss:>+7.1f}M "
            f"{start_fds:>4.0f}→{end_fds:<4.0f} {'yes' if ok else 'NO':>4}"
        )
    return healthy


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 1 when a process grew past the bounds or a call crashed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--max-calls", type=int, default=1_000_000)
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    parser.add_argument("--max-fd-growth", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.warmup_minutes >= args.minutes:
        parser.error("--warmup-minutes must be shorter than --minutes")
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="tensafe-soak-") as tmp:
        data_dir = Path(tmp)
        build_tiny_model(data_dir / "models" / BASE_MODEL, seed=0)
        with LocalStack(StackOptions(data_dir=data_dir, database_url=args.database_url)) as stack:
            stack.start()
            tenant = create_tenant(stack.connection_file, name="soak")
            processes = stack_processes(data_dir)
            print(f"processes: {processes}")
            started = time.monotonic()
            deadline = started + args.minutes * 60
            traffic = Traffic(
                stack.connection_file, tenant.api_key, deadline, args.max_calls, args.seed
            )
            samples: dict[str, list[Sample]] = collections.defaultdict(list)
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=sampler,
                    args=(processes, samples, stop, args.sample_seconds, started),
                    daemon=True,
                ),
                threading.Thread(target=traffic.valid, daemon=True),
                threading.Thread(target=traffic.garbage, daemon=True),
            ]
            for thread in threads:
                thread.start()
            for thread in threads[1:]:
                thread.join()
            stop.set()
            threads[0].join()
            traffic.close()
            alive = {name: read_process(pid) is not None for name, pid in processes.items()}
    elapsed = time.monotonic() - started
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{traffic.counts.total()} calls in {elapsed / 60:.1f} min")
    for kind, counts in sorted(traffic.counts.by_kind.items()):
        print(f"  {kind:28} {dict(counts.most_common())}")
    healthy = report(samples, args.warmup_minutes * 60, args.max_rss_growth_mib, args.max_fd_growth)
    if not all(alive.values()):
        print(f"processes that died: {[name for name, up in alive.items() if not up]}")
        healthy = False
    if traffic.counts.crashes:
        print("crashes:\n  " + "\n  ".join(traffic.counts.crashes))
        healthy = False
    print("PASS" if healthy else "FAIL")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
