"""The ``tensafe`` command line.

``tensafe up`` runs the local stack, ``tensafe status`` checks each service's health,
``tensafe serve <service>`` runs one service in the foreground (the container
entry point does the same). ``tensafe admin bootstrap`` creates the first admin of a
fresh deployment (run beside the auth service's database, like ``serve``);
``tensafe audit verify`` asks the auth service to verify its audit hash chain.

Structure: :func:`build_parser` registers every command; a command that lives in its
own module adds itself with one line, ``<module>.register(<subparsers>)``, and sets
``func``. Importing this module (and so ``tensafe --help`` or ``tensafe status``) loads
no torch, transformers or SEAL: those are imported inside the commands that need them,
and :func:`main` turns a missing one into a message naming the extra to install
(:mod:`tensafe.client.extras`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensafe.client import audit_cli, demo, kek_cli, plot_cli, registry_cli, token_cli, train_cli
from tensafe.client.connection import DEFAULT_DATA_DIR, load_connection
from tensafe.client.stack import SERVICES, WORKER_MODULE, LocalStack, StackError, StackOptions

SERVE_TARGETS = {
    **{name.replace("_", "-"): f"tensafe.{name}" for name in SERVICES},
    "trainer-worker": WORKER_MODULE,
}


def _cmd_up(args: argparse.Namespace) -> int:
    from tensafe.client.extras import require_installed

    # The services import these; say which extra is missing before starting any.
    require_installed(
        ("torch", "transformers", "peft", "opacus", "dp_accounting", "seal"), "tensafe up"
    )
    options = StackOptions(
        data_dir=Path(args.data_dir),
        database_url=args.database_url,
        nats_url=args.nats_url,
        tls=args.tls,
        builtin_base_model=not args.no_base_model,
    )
    stack = LocalStack(options)
    print("tensafe up: DEV MODE (no production secrets; loopback only)", flush=True)
    try:
        connection = stack.start()
    except (StackError, OSError) as exc:
        stack.stop()
        print(f"tensafe up: {exc}", file=sys.stderr)
        return 1
    services = connection["services"]
    assert isinstance(services, dict)
    for name, address in services.items():
        print(f"  {name:<11} {address}")
    print(f"  {'nats':<11} {connection['nats_url']}")
    print(f"  {'tinker api':<11} {connection['tinker_base_url']}  (TINKER_BASE_URL)")
    # The SDK's get_tokenizer() reaches the Tinker API only through huggingface_hub's
    # HF_ENDPOINT (docs/tinker.md, "Tokenizers through the Hub protocol").
    print(
        f"  {'':<11} get_tokenizer(): HF_ENDPOINT={connection['tinker_base_url']}"
        "  HF_TOKEN=<your API key>"
    )
    print(f"  {'console':<11} {connection['console_url']}  (sign in with an API key)")
    if stack.installed_base_model is not None:
        print(
            f"base model: installed the built-in pretrained tiny-llama in "
            f"{stack.installed_base_model} (fresh data dir; --no-base-model skips it)",
            flush=True,
        )
    print(f"connection file: {stack.connection_file}", flush=True)
    tls = connection.get("tls")
    if isinstance(tls, dict):
        print(
            f"mutual TLS: every service requires a client certificate issued by the local "
            f"development CA {tls['ca_file']}; the SDK and CLI use {tls['client_cert_file']} "
            "(named in the connection file)",
            flush=True,
        )
    print(
        "DEV MODE: the admin API key is stored in the connection file (mode 0600); "
        f"service credentials in {options.data_dir / 'credentials.json'}",
        flush=True,
    )
    print(f"logs: {options.data_dir / 'logs'}", flush=True)
    print("ready; Ctrl-C or SIGTERM stops everything", flush=True)
    try:
        reason = stack.wait()
    finally:
        stack.stop()
    print(f"tensafe up: stopped ({reason})", flush=True)
    return 0 if reason == "signal" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        connection = load_connection(args.connection_file)
    except FileNotFoundError as exc:
        print(f"tensafe status: {exc}", file=sys.stderr)
        return 1
    healthy = True
    for name, address in connection.services.items():
        with connection.channel(name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as exc:
                state = f"UNREACHABLE ({exc.code().name})"
        healthy &= state == "SERVING"
        print(f"{name:<11} {address:<22} {state}")
    return 0 if healthy else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    module = SERVE_TARGETS[args.service]
    os.execv(sys.executable, [sys.executable, "-m", module])  # noqa: S606 - replaces this process


def _cmd_admin_bootstrap(args: argparse.Namespace) -> int:
    # Server-side work: the auth package does it, in its own process, as `serve` does.
    argv = [
        sys.executable,
        "-m",
        "tensafe.auth.bootstrap",
        "--tenant-name",
        args.tenant_name,
        "--admin-name",
        args.admin_name,
    ]
    for name in args.service_account:
        argv += ["--service-account", name]
    if args.json:
        argv.append("--json")
    if args.credentials_file:
        argv += ["--credentials-file", args.credentials_file]
    os.execv(sys.executable, argv)  # noqa: S606 - replaces this process


def _with_auth(args: argparse.Namespace, command: str, call: Callable[[Any], int]) -> int:
    """Run ``call(stub)`` against the auth service with the SDK's API-key credentials.

    Exit codes: what ``call`` returns; 2 when the call fails (the message says why).
    """
    from tensafe.client.auth import TokenProvider, authenticated_channel, find_api_key
    from tensafe.common.errors import TenSafeError
    from tensafe.common.grpc_errors import from_rpc_error
    from tensafe.proto.auth.v1 import auth_service_pb2_grpc

    try:
        connection = load_connection(args.connection_file)
        channel = connection.channel("auth")
        api_key = find_api_key(connection_file=connection.path)
    except (FileNotFoundError, KeyError, TenSafeError) as exc:
        print(f"tensafe {command}: {exc}", file=sys.stderr)
        return 2
    with channel:
        provider = TokenProvider(channel, api_key)
        stub = auth_service_pb2_grpc.AuthServiceStub(authenticated_channel(channel, provider))
        try:
            return call(stub)
        except grpc.RpcError as exc:
            print(f"tensafe {command}: {from_rpc_error(exc).message}", file=sys.stderr)
        except TenSafeError as exc:
            print(f"tensafe {command}: {exc.message}", file=sys.stderr)
    return 2


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from tensafe.proto.auth.v1 import auth_service_pb2 as pb

    def call(stub: Any) -> int:
        verdict = stub.VerifyAuditLog(pb.VerifyAuditLogRequest(), timeout=args.timeout)
        if verdict.ok:
            print(f"audit log OK: {verdict.entries_checked} entries verified")
            return 0
        print(
            f"audit log BROKEN at entry {verdict.first_bad_seq}: {verdict.reason} "
            f"({verdict.entries_checked} entries checked)"
        )
        return 1

    return _with_auth(args, "audit verify", call)


_ROLES = ("admin", "trainer", "reader")


def _cmd_admin_create_tenant(args: argparse.Namespace) -> int:
    from tensafe.proto.auth.v1 import auth_service_pb2 as pb

    def call(stub: Any) -> int:
        if args.trainer:
            from tensafe.client.tenants import create_tenant_with_trainer

            made = create_tenant_with_trainer(
                stub, args.name, trainer_name=args.trainer, request_id=args.request_id
            )
            print(f"tenant {made.tenant_id} ({args.name})")
            print(f"trainer principal {made.principal_id} ({args.trainer})")
            print(f"API key of {args.trainer} (shown once, store it now): {made.api_key}")
            print(
                "use it instead of the admin key of the connection file:\n"
                f"export TENSAFE_API_KEY={made.api_key}"
            )
            return 0
        request = pb.CreateTenantRequest(display_name=args.name, request_id=args.request_id)
        tenant = stub.CreateTenant(request).tenant
        print(f"tenant {tenant.id} ({tenant.display_name})")
        return 0

    return _with_auth(args, "admin create-tenant", call)


def _cmd_admin_create_principal(args: argparse.Namespace) -> int:
    from tensafe.proto.auth.v1 import auth_service_pb2 as pb

    def call(stub: Any) -> int:
        kind = pb.PRINCIPAL_KIND_SERVICE_ACCOUNT if args.service_account else pb.PRINCIPAL_KIND_USER
        roles = [pb.Role.Value(f"ROLE_{role.upper()}") for role in args.role]
        request = pb.CreatePrincipalRequest(
            kind=kind, name=args.name, roles=roles, tenant_id=args.tenant_id or ""
        )
        principal = stub.CreatePrincipal(request).principal
        print(f"principal {principal.id} ({principal.name}) in tenant {principal.tenant_id}")
        return 0

    return _with_auth(args, "admin create-principal", call)


def _cmd_admin_create_api_key(args: argparse.Namespace) -> int:
    from google.protobuf import duration_pb2

    from tensafe.proto.auth.v1 import auth_service_pb2 as pb

    def call(stub: Any) -> int:
        request = pb.CreateApiKeyRequest(
            principal_id=args.principal_id, description=args.description
        )
        if args.ttl_days:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(args.ttl_days * 86400)))
        response = stub.CreateApiKey(request)
        print(f"API key {response.api_key.id} (prefix {response.api_key.prefix})")
        print(f"secret (shown once, store it now): {response.secret}")
        return 0

    return _with_auth(args, "admin create-api-key", call)


def _cmd_admin_revoke_api_key(args: argparse.Namespace) -> int:
    from tensafe.proto.auth.v1 import auth_service_pb2 as pb

    def call(stub: Any) -> int:
        key = stub.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=args.api_key_id)).api_key
        print(f"API key {key.id} revoked")
        return 0

    return _with_auth(args, "admin revoke-api-key", call)


def _cmd_admin_rotate_signing_key(args: argparse.Namespace) -> int:
    from tensafe.proto.auth.v1 import auth_service_pb2 as pb

    def call(stub: Any) -> int:
        print(f"new signing key {stub.RotateSigningKey(pb.RotateSigningKeyRequest()).kid}")
        return 0

    return _with_auth(args, "admin rotate-signing-key", call)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    import json

    from tensafe.client.tiny_model import build_tiny_model, tiny_corpus, weights_digest

    path = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"{path}  weights sha256 {weights_digest(path)}")
    if args.corpus:
        with open(args.corpus, "w") as file:
            for text in tiny_corpus():
                file.write(json.dumps({"text": text}) + "\n")
        print(f"corpus: {args.corpus} ({len(tiny_corpus())} texts)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tensafe`` command."""
    parser = argparse.ArgumentParser(
        prog="tensafe",
        description="TenSafe: privacy-first fine-tuning and serving of LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole stack on this machine (dev mode)")
    up.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="state folder (kept)")
    up.add_argument("--database-url", help="shared PostgreSQL URL instead of SQLite files")
    up.add_argument("--nats-url", help="external NATS instead of the embedded server")
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS everywhere, with a local development CA created in <data-dir>/tls",
    )
    up.add_argument(
        "--no-base-model",
        action="store_true",
        help="do not install the built-in pretrained tiny-llama into a fresh data dir",
    )
    up.set_defaults(func=_cmd_up)

    status = sub.add_parser("status", help="health of each service of the stack")
    status.add_argument("--connection-file", help="default: .tensafe/connection.json")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds per check")
    status.set_defaults(func=_cmd_status)

    tiny = sub.add_parser(
        "tiny-model",
        help="build the tiny Llama-style model + BPE tokenizer (for demos and tests)",
    )
    tiny.add_argument("out_dir", type=Path, help="folder to write (save_pretrained layout)")
    tiny.add_argument("--seed", type=int, default=0, help="weights and tokenizer seed")
    tiny.add_argument("--corpus", type=Path, help="also write the built-in corpus as JSONL")
    tiny.set_defaults(func=_cmd_tiny_model)

    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=sorted(SERVE_TARGETS))
    serve.set_defaults(func=_cmd_serve)

    admin = sub.add_parser("admin", help="deployment administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    bootstrap = admin_sub.add_parser(
        "bootstrap",
        help="create the first admin and API key of a fresh deployment (prints the key once)",
        description="Runs python -m tensafe.auth.bootstrap with the auth service's "
        "TENSAFE_* settings (database, data dir, key-encryption key or dev mode). "
        "Exit code 3: already bootstrapped.",
    )
    bootstrap.add_argument("--tenant-name", default="platform", help="platform tenant's name")
    bootstrap.add_argument("--admin-name", default="admin", help="first admin user's name")
    bootstrap.add_argument(
        "--service-account",
        action="append",
        default=[],
        metavar="NAME",
        help="also create a service account (reader) with a key; repeatable",
    )
    bootstrap.add_argument("--json", action="store_true", help="print the result as JSON")
    bootstrap.add_argument(
        "--credentials-file", help="write the result to this new file (mode 0600)"
    )
    bootstrap.set_defaults(func=_cmd_admin_bootstrap)

    def with_connection(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument("--connection-file", help="default: .tensafe/connection.json")
        return command

    tenant = with_connection(admin_sub.add_parser("create-tenant", help="create a tenant"))
    tenant.add_argument("name", help="unique display name")
    tenant.add_argument("--request-id", default="", help="idempotency key")
    tenant.add_argument(
        "--trainer",
        metavar="NAME",
        help="also create a trainer principal NAME in the tenant and an API key for it "
        "(printed once, as an export TENSAFE_API_KEY=... line)",
    )
    tenant.set_defaults(func=_cmd_admin_create_tenant)

    principal = with_connection(
        admin_sub.add_parser("create-principal", help="create a user or service account")
    )
    principal.add_argument("name", help="unique within the tenant")
    principal.add_argument(
        "--role", action="append", choices=_ROLES, required=True, help="repeatable"
    )
    principal.add_argument("--tenant-id", help="default: the caller's tenant")
    principal.add_argument("--service-account", action="store_true", help="not a person")
    principal.set_defaults(func=_cmd_admin_create_principal)

    api_key = with_connection(
        admin_sub.add_parser("create-api-key", help="create an API key (secret shown once)")
    )
    api_key.add_argument("principal_id")
    api_key.add_argument("--description", default="")
    api_key.add_argument("--ttl-days", type=float, default=0.0, help="0: no expiry")
    api_key.set_defaults(func=_cmd_admin_create_api_key)

    revoke = with_connection(admin_sub.add_parser("revoke-api-key", help="revoke an API key"))
    revoke.add_argument("api_key_id")
    revoke.set_defaults(func=_cmd_admin_revoke_api_key)

    rotate = with_connection(
        admin_sub.add_parser("rotate-signing-key", help="start signing tokens with a new key")
    )
    rotate.set_defaults(func=_cmd_admin_rotate_signing_key)
    kek_cli.register(admin_sub)

    audit = sub.add_parser("audit", help="the security audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="verify the audit hash chain")
    verify.add_argument("--connection-file", help="default: .tensafe/connection.json")
    verify.add_argument("--timeout", type=float, default=60.0, help="seconds")
    verify.set_defaults(func=_cmd_audit_verify)
    audit_cli.register(audit_sub)

    train_cli.register(sub)
    registry_cli.register(sub)
    demo.register(sub)
    token_cli.register(sub)
    plot_cli.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tensafe")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tensafe`` console script.

    Exit code 2 with one line naming the extra when a command needs an optional
    dependency that is not installed.
    """
    from tensafe.client.extras import MissingExtra, missing_extra

    args = build_parser().parse_args(argv)
    what = f"tensafe {args.command}"
    try:
        code: int = args.func(args)
    except MissingExtra as error:
        print(error.message, file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        explained = missing_extra(error, what)
        if explained is None:
            raise
        print(explained.message, file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
