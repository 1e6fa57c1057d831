"""Invariants of the services' SQLite state, checked read-only after a fuzz run.

:func:`check_stack` opens each service's database of a local stack
(``<data_dir>/db/<svc>.db``) read-only, in one read transaction per database so the
rows are a consistent snapshot even while the trainer worker still commits, and
returns every violation of the rules below (an empty list when all hold). Each rule
follows from the stores' schemas and the code that writes them:

auth
    The audit log's hash chain verifies up to the recorded head
    (:class:`tensafe.auth.domain.audit.ChainVerifier`, the same code as
    ``VerifyAuditLog``); exactly one platform tenant; every principal's tenant exists;
    every API key's principal exists and the key's tenant is the principal's; every
    issued token names an existing principal of its tenant; states and roles are
    known values.
trainer
    Futures: a known status, a result only when SUCCEEDED, an error code exactly when
    FAILED and never one of a crash (INTERNAL, UNKNOWN, DATA_LOSS: a job the API
    admitted must fail with a typed error), a finish time exactly when finished.
    Training clients: ``0 <= applied_seq <= next_seq``; the privacy ledger holds
    exactly steps ``1..dp_steps`` with non-decreasing ε, the last of which is
    ``epsilon_spent``. Jobs: their client and
    future exist, ``1 <= seq <= next_seq``, and every job at or before ``applied_seq``
    is DONE with a finished future. An open budget reservation belongs to a QUEUED job.
    Every object a row names (state, checkpoint, dataset) exists with its recorded
    sha256, and no temporary object is left behind.
registry
    Every version belongs to an existing adapter of the same tenant, below its
    ``next_version``; its package exists in the object store with the recorded sha256
    and size; every alias names an existing version; the staging folder is empty.
he_runtime
    Every session row has its Galois-key file of exactly ``key_bytes`` bytes and every
    key file has its row; no temporary key file is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from tensafe.auth.domain.audit import ChainVerifier, from_epoch_micros
from tensafe.auth.domain.model import AuditEvent, PrincipalKind, Role, TenantState
from tensafe.common.model_folders import file_sha256

FUTURE_STATUSES = {"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}
FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}
CRASHED = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
"""Error codes of a job that crashed in the worker instead of failing validation."""


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken invariant.

    Attributes:
        service: The service whose state breaks it.
        rule: Short name of the rule.
        detail: Which rows, and what was found.
    """

    service: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.service}] {self.rule}: {self.detail}"


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a SQLite file, inside one read transaction."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    connection.row_factory = sqlite3.Row
    try:
        connection.execute("BEGIN")
        yield connection
        connection.execute("COMMIT")
    finally:
        connection.close()


def check_auth(db: Path) -> list[Violation]:
    """The auth rules of the module docstring."""
    found: list[Violation] = []

    def bad(rule: str, detail: str) -> None:
        found.append(Violation("auth", rule, detail))

    with read_only(db) as sql:
        verifier = ChainVerifier()
        rows = sql.execute("SELECT * FROM auth_audit_events ORDER BY seq").fetchall()
        verifier.feed(
            AuditEvent(
                seq=row["seq"],
                event_id=row["event_id"],
                time=from_epoch_micros(row["time_us"]),
                service=row["service"],
                kind=row["kind"],
                tenant_id=row["tenant_id"],
                principal_id=row["principal_id"],
                payload_json=row["payload_json"],
                prev_hash=row["prev_hash"],
                hash=row["hash"],
            )
            for row in rows
        )
        head = sql.execute(
            "SELECT last_seq, last_hash FROM auth_audit_head WHERE id = 1"
        ).fetchone()
        if head is None:
            bad("audit head", "no auth_audit_head row")
        else:
            verdict = verifier.finish(head_seq=head["last_seq"], head_hash=head["last_hash"])
            if not verdict.ok:
                bad("audit chain", f"seq {verdict.first_bad_seq}: {verdict.reason}")

        tenants = {row["id"]: row for row in sql.execute("SELECT * FROM auth_tenants")}
        platform = [t for t, row in tenants.items() if row["is_platform"]]
        if len(platform) != 1:
            bad("platform tenant", f"{len(platform)} platform tenants: {platform}")
        states = {s.value for s in TenantState}
        for tenant_id, row in tenants.items():
            if row["state"] not in states:
                bad("tenant state", f"tenant {tenant_id} has state {row['state']!r}")

        principals = {row["id"]: row for row in sql.execute("SELECT * FROM auth_principals")}
        roles = {r.value for r in Role}
        kinds = {k.value for k in PrincipalKind}
        for principal_id, row in principals.items():
            if row["tenant_id"] not in tenants:
                bad("principal tenant", f"principal {principal_id} in missing {row['tenant_id']}")
            unknown = [r for r in row["roles"].split(",") if r and r not in roles]
            if unknown or row["kind"] not in kinds:
                bad("principal", f"principal {principal_id}: kind {row['kind']}, roles {unknown}")

        for row in sql.execute("SELECT * FROM auth_api_keys"):
            owner = principals.get(row["principal_id"])
            if owner is None:
                bad("api key owner", f"key {row['id']} of missing principal {row['principal_id']}")
            elif owner["tenant_id"] != row["tenant_id"]:
                bad(
                    "api key tenant",
                    f"key {row['id']} in tenant {row['tenant_id']}, its principal in "
                    f"{owner['tenant_id']}",
                )
        for row in sql.execute("SELECT * FROM auth_tokens"):
            owner = principals.get(row["principal_id"])
            if owner is None or owner["tenant_id"] != row["tenant_id"]:
                bad("token owner", f"token {row['token_id']} of {row['principal_id']}")
    return found


def check_trainer(db: Path, objects: Path) -> list[Violation]:
    """The trainer rules of the module docstring.

    Args:
        db: The trainer's SQLite file.
        objects: The trainer's object folder (paths in rows are relative to it).
    """
    found: list[Violation] = []

    def bad(rule: str, detail: str) -> None:
        found.append(Violation("trainer", rule, detail))

    def object_matches(what: str, relative: str | None, sha256: str | None) -> None:
        if relative is None:
            return
        path = objects / relative
        if not path.is_file():
            bad("object missing", f"{what}: {relative}")
        elif file_sha256(path) != sha256:
            bad("object digest", f"{what}: {relative} does not match its sha256")

    with read_only(db) as sql:
        futures = {row["id"]: row for row in sql.execute("SELECT * FROM trainer_futures")}
        for future_id, row in futures.items():
            status = row["status"]
            if status not in FUTURE_STATUSES:
                bad("future status", f"future {future_id}: {status!r}")
            if row["result"] is not None and status != "SUCCEEDED":
                bad("future result", f"future {future_id} is {status} but has a result")
            if (row["error_code"] is not None) != (status == "FAILED"):
                bad("future error", f"future {future_id} is {status}, error {row['error_code']}")
            if row["error_code"] in CRASHED:
                bad(
                    "future crashed",
                    f"future {future_id} ({row['kind']}) failed with {row['error_code']}: "
                    f"{(row['error_message'] or '')[:300]}",
                )
            if (row["finished_at"] is not None) != (status in FINISHED):
                bad(
                    "future finish",
                    f"future {future_id} is {status}, finished {row['finished_at']}",
                )

        clients = {row["id"]: row for row in sql.execute("SELECT * FROM trainer_training_clients")}
        ledger: dict[str, list[sqlite3.Row]] = {}
        for row in sql.execute("SELECT * FROM trainer_privacy_ledger ORDER BY client_id, dp_step"):
            ledger.setdefault(row["client_id"], []).append(row)
        # Lineage events (a LoadState took on another client's history) also move ε.
        inherited: dict[str, list[sqlite3.Row]] = {}
        for row in sql.execute("SELECT * FROM trainer_privacy_lineage ORDER BY client_id, id"):
            inherited.setdefault(row["client_id"], []).append(row)
        for client_id, row in clients.items():
            if not 0 <= row["applied_seq"] <= row["next_seq"]:
                bad(
                    "client seq",
                    f"client {client_id}: applied {row['applied_seq']}, next {row['next_seq']}",
                )
            entries = ledger.get(client_id, [])
            steps = [entry["dp_step"] for entry in entries]
            if steps != list(range(1, row["dp_steps"] + 1)):
                bad(
                    "ledger steps",
                    f"client {client_id}: dp_steps {row['dp_steps']}, ledger {steps}",
                )
            events = sorted(
                [*entries, *inherited.get(client_id, [])],
                key=lambda entry: (entry["created_at"], entry["epsilon_after"]),
            )
            epsilons = [entry["epsilon_after"] for entry in events]
            if any(not math.isfinite(e) or e < 0 for e in epsilons) or any(
                later < earlier for earlier, later in itertools.pairwise(epsilons)
            ):
                bad("ledger epsilon", f"client {client_id}: ε sequence {epsilons}")
            if epsilons and not math.isclose(epsilons[-1], row["epsilon_spent"], rel_tol=1e-12):
                bad(
                    "epsilon spent",
                    f"client {client_id}: epsilon_spent {row['epsilon_spent']}, last ledger "
                    f"entry {epsilons[-1]}",
                )
            if row["state"] == "ACTIVE":
                object_matches(
                    f"state of client {client_id}", row["state_path"], row["state_sha256"]
                )

        jobs = {row["future_id"]: row for row in sql.execute("SELECT * FROM trainer_jobs")}
        for future_id, row in jobs.items():
            client = clients.get(row["client_id"])
            future = futures.get(future_id)
            if client is None or future is None:
                bad("job refs", f"job {future_id}: client or future missing")
                continue
            if not 1 <= row["seq"] <= client["next_seq"]:
                bad("job seq", f"job {future_id}: seq {row['seq']}, next {client['next_seq']}")
            if row["status"] not in ("QUEUED", "DONE"):
                bad("job status", f"job {future_id}: {row['status']!r}")
            if row["seq"] <= client["applied_seq"] and (
                row["status"] != "DONE" or future["status"] not in FINISHED
            ):
                bad(
                    "job applied",
                    f"job {future_id} (seq {row['seq']} <= applied {client['applied_seq']}) is "
                    f"{row['status']}, its future {future['status']}",
                )
        for row in sql.execute("SELECT * FROM trainer_budget_reservations"):
            if row["status"] not in ("RESERVED", "CONSUMED", "RELEASED"):
                bad("reservation status", f"reservation {row['future_id']}: {row['status']!r}")
            job = jobs.get(row["future_id"])
            if row["status"] == "RESERVED" and (job is None or job["status"] != "QUEUED"):
                bad("reservation open", f"reservation {row['future_id']} open for a finished job")

        for row in sql.execute("SELECT * FROM trainer_checkpoints"):
            if clients.get(row["client_id"], {"state": ""})["state"] == "ACTIVE":
                object_matches(f"checkpoint {row['id']}", row["object_path"], row["sha256"])
        for row in sql.execute("SELECT * FROM trainer_datasets"):
            object_matches(f"dataset {row['id']}", row["object_path"], row["sha256"])
    leftovers = [p for p in objects.rglob("*.tmp")]
    if leftovers:
        bad("temporary objects", f"{[str(p.relative_to(objects)) for p in leftovers]}")
    return found


def check_registry(db: Path, objects: Path) -> list[Violation]:
    """The registry rules of the module docstring.

    Args:
        db: The registry's SQLite file.
        objects: The registry's object store root (``sha256/`` and ``staging/``).
    """
    found: list[Violation] = []

    def bad(rule: str, detail: str) -> None:
        found.append(Violation("registry", rule, detail))

    with read_only(db) as sql:
        adapters = {row["id"]: row for row in sql.execute("SELECT * FROM registry_adapters")}
        versions: set[tuple[str, int]] = set()
        for row in sql.execute("SELECT * FROM registry_versions"):
            versions.add((row["adapter_id"], row["version"]))
            adapter = adapters.get(row["adapter_id"])
            label = f"version {row['version']} of adapter {row['adapter_id']}"
            if adapter is None:
                bad("version adapter", f"{label}: adapter missing")
            elif adapter["tenant_id"] != row["tenant_id"] or not (
                1 <= row["version"] < adapter["next_version"]
            ):
                bad("version", f"{label}: tenant or number inconsistent with the adapter")
            digest = row["package_sha256"]
            path = objects / "sha256" / digest[:2] / digest
            if not path.is_file():
                bad("package missing", f"{label}: {digest}")
            elif path.stat().st_size != row["size_bytes"] or file_sha256(path) != digest:
                bad("package digest", f"{label}: the stored object does not match")
        for row in sql.execute("SELECT * FROM registry_aliases"):
            if (row["adapter_id"], row["version"]) not in versions:
                bad("alias", f"alias {row['alias']} of {row['adapter_id']} -> v{row['version']}")
    staging = objects / "staging"
    leftovers = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
    if leftovers:
        bad("staging", f"partial uploads left in {staging}: {leftovers}")
    return found


def check_he_runtime(db: Path, keys: Path) -> list[Violation]:
    """The he_runtime rules of the module docstring.

    Args:
        db: The HE runtime's SQLite file.
        keys: Its key folder (``<data_dir>/he_runtime/keys``).
    """
    found: list[Violation] = []
    with read_only(db) as sql:
        rows = {row["id"]: row["key_bytes"] for row in sql.execute("SELECT * FROM he_sessions")}
    files = {p.name: p for p in keys.iterdir()} if keys.is_dir() else {}
    for session_id, key_bytes in rows.items():
        path = files.pop(f"{session_id}.galois", None)
        if path is None or path.stat().st_size != key_bytes:
            found.append(Violation("he_runtime", "key file", f"session {session_id}"))
    if files:
        found.append(Violation("he_runtime", "orphan key files", str(sorted(files))))
    return found


def check_stack(data_dir: Path) -> list[Violation]:
    """Every invariant of every service of the local stack at ``data_dir``."""
    return [
        *check_auth(data_dir / "db" / "auth.db"),
        *check_trainer(
            data_dir / "db" / "trainer.db", data_dir / "objects" / "trainer" / "trainer"
        ),
        *check_registry(
            data_dir / "db" / "registry.db", data_dir / "objects" / "registry" / "objects"
        ),
        *check_he_runtime(
            data_dir / "db" / "he_runtime.db",
            data_dir / "objects" / "he_runtime" / "he_runtime" / "keys",
        ),
    ]
