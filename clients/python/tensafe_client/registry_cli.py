"""``tensafe registry``: inspect, verify, seal, publish, download and export TGSP packages.

Offline (no service needed): ``inspect FILE`` prints the manifest (a claim until
verified); ``verify FILE --key PEM`` checks signature, digests and structure against
given public keys; ``import DIR`` seals a PEFT adapter directory as a package (its DP
certificate says that no guarantee is known). Against the registry: ``publish``,
``download``, ``verify FILE`` without ``--key`` (the registry's published keys),
``export`` (download, unwrap the data key through the audited ``UnwrapDataKey``,
decrypt, write a PEFT directory), ``list``, ``versions``, ``alias``, ``delete``, ``keys``.

Sealing needs the tenant's KEK and a signing key the registry trusts. Against the local
stack (``tensafe up``, dev mode) both default to the registry's dev-mode files in the
stack's data dir; elsewhere pass ``--kek-dir`` and ``--signing-key``. ``--create-kek``
creates the tenant's KEK in that folder if it has none (an explicit step, reported).

Exit codes: 0 done, 2 bad input or a refused call (the message says why), 3 a package
that failed verification.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tensafe import tgsp
from tensafe.common.errors import IntegrityError, TenSafeError

CODE_VERSION = "tensafe-cli-import/0.1.0"
"""``provenance.code_version`` of imported packages: what produced the package."""

# The registry's dev-mode files under the stack's data dir (``tensafe up`` gives each
# service ``<data dir>/objects/<service>`` as its own data dir). Kept as literals: the
# CLI does not import service packages.
_STACK_REGISTRY_DIR = Path("objects") / "registry"
_DEV_SIGNING_KEY_FILE = "dev-registry-signing-key.pem"


def _client(args: argparse.Namespace) -> Any:
    from tensafe.client.registry import RegistryClient

    return RegistryClient.connect(connection_file=args.connection_file)


def _stack_registry_dir(args: argparse.Namespace) -> Path:
    """The local stack's registry data dir (dev mode only)."""
    from tensafe.client.connection import load_connection

    connection = load_connection(args.connection_file)
    document = json.loads(connection.path.read_text())
    if not document.get("dev_mode"):
        raise TenSafeError("not a dev-mode stack: pass --kek-dir and --signing-key explicitly")
    return Path(str(document["data_dir"])) / _STACK_REGISTRY_DIR


def _stack_kek_dir(args: argparse.Namespace) -> Path:
    """The local stack's shared KEK folder (registry and trainer; dev mode only)."""
    from tensafe.client.connection import load_connection

    connection = load_connection(args.connection_file)
    document = json.loads(connection.path.read_text())
    if not document.get("dev_mode") or not document.get("kek_dir"):
        raise TenSafeError("not a dev-mode stack: pass --kek-dir and --signing-key explicitly")
    return Path(str(document["kek_dir"]))


def _print_manifest(manifest: tgsp.Manifest, signer: str) -> None:
    document = json.loads(manifest.canonical_bytes())
    print(json.dumps({"signer_key_id": signer, "manifest": document}, indent=2, sort_keys=True))


def cmd_inspect(args: argparse.Namespace) -> int:
    """``registry inspect FILE``."""
    manifest = tgsp.inspect(Path(args.file))
    _print_manifest(manifest, tgsp.signer_key_id(Path(args.file)))
    print("(not verified: use `tensafe registry verify`)", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``registry verify FILE``."""
    path = Path(args.file)
    if args.key:
        keys = [tgsp.VerifyingKey.from_pem(Path(k).read_bytes()) for k in args.key]
    else:
        with _client(args) as client:
            keys = client.signing_keys()
    manifest = tgsp.verify(path, trusted_keys=keys, expected_tenant=args.tenant or None)
    print(
        f"OK: {manifest.adapter.adapter_id} version {manifest.adapter.version} of tenant "
        f"{manifest.tenant_id}, signed by {tgsp.signer_key_id(path)}"
    )
    return 0


def _caller_tenant(args: argparse.Namespace) -> str:
    import jwt

    from tensafe.client.auth import TokenProvider, find_api_key
    from tensafe.client.connection import load_connection

    connection = load_connection(args.connection_file)
    with connection.channel("auth") as channel:
        token = TokenProvider(channel, find_api_key(connection_file=connection.path)).token()
    # The claims are only read to pick a default; the registry verifies the token.
    return str(jwt.decode(token, options={"verify_signature": False})["tenant"])


def cmd_import(args: argparse.Namespace) -> int:
    """``registry import DIR``."""
    directory = Path(args.directory)
    if args.kek_dir and args.signing_key:
        kek_dir, key_file = Path(args.kek_dir), Path(args.signing_key)
    else:
        stack_dir = _stack_registry_dir(args)
        kek_dir = Path(args.kek_dir) if args.kek_dir else _stack_kek_dir(args)
        key_file = Path(args.signing_key) if args.signing_key else stack_dir / _DEV_SIGNING_KEY_FILE
    tenant = args.tenant or _caller_tenant(args)
    provider = tgsp.LocalFileKekProvider(kek_dir)
    if not provider.has_tenant_kek(tenant):
        if not args.create_kek:
            raise TenSafeError(
                f"tenant {tenant} has no KEK in {kek_dir}; pass --create-kek to create it"
            )
        kek_id = provider.create_tenant_kek(tenant)
        print(f"created KEK {kek_id} for tenant {tenant} in {kek_dir}", file=sys.stderr)
    config = json.loads((directory / tgsp.ADAPTER_CONFIG_NAME).read_text())
    base_model_id = args.base_model_id or config.get("base_model_name_or_path") or ""
    if not base_model_id:
        raise TenSafeError("--base-model-id is required (the adapter config names none)")
    package = tgsp.package_peft_dir(
        directory,
        adapter=tgsp.AdapterRef(adapter_id=args.name, version=args.adapter_version),
        base_model=tgsp.BaseModelRef(model_id=base_model_id, weights_sha256=args.base_model_sha256),
        provenance=tgsp.Provenance(
            tenant_id=tenant,
            training_client_id=None,
            code_version=CODE_VERSION,
            created_at=datetime.now(UTC),
        ),
        kek_provider=provider,
        signing_key=tgsp.SigningKey.from_pem(key_file.read_bytes()),
    )
    output = Path(args.output)
    with open(output, "xb") as file:
        file.write(package)
    print(f"sealed {directory} as {output} ({len(package)} bytes) for tenant {tenant}")
    if args.publish:
        with _client(args) as client:
            version = client.publish(args.name, output)
        print(f"published {version.adapter_name} version {version.version}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """``registry publish FILE``."""
    name = args.name or tgsp.inspect(Path(args.file)).adapter.adapter_id
    with _client(args) as client:
        version = client.publish(name, Path(args.file), request_id=args.request_id or None)
    print(f"published {version.adapter_name} version {version.version} ({version.package_sha256})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """``registry download NAME``."""
    with _client(args) as client:
        result = client.download(
            args.name, version=args.version, alias=args.alias or "", destination=args.output
        )
    print(
        f"downloaded {args.name} version {result.version.version} to {args.output} "
        f"({result.version.size_bytes} bytes, verified by the registry)"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``registry export NAME``."""
    with _client(args) as client:
        manifest = client.export_peft_dir(
            args.name, Path(args.output), version=args.version, alias=args.alias or ""
        )
    print(f"wrote the PEFT adapter {manifest.adapter.adapter_id} to {args.output}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``registry list``."""
    with _client(args) as client:
        adapters = list(client.list_adapters())
    if not adapters:
        # An empty listing is an answer, not silence: say so on stdout (exit 0).
        print(
            "no packages: this tenant's registry is empty (publish one with "
            "TrainingClient.save_adapter or tensafe registry publish)"
        )
    for adapter in adapters:
        aliases = ", ".join(f"{k}→{v}" for k, v in sorted(adapter.aliases.items()))
        print(f"{adapter.name}\tlatest {adapter.latest_version}\t{aliases}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    """``registry versions NAME``."""
    with _client(args) as client:
        for version in client.list_versions(args.name):
            print(f"{version.version}\t{version.package_sha256}\t{version.size_bytes}")
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    """``registry alias NAME ALIAS VERSION``."""
    with _client(args) as client:
        client.set_alias(args.name, args.alias, args.version)
    print(f"{args.name}: {args.alias} → {args.version}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """``registry delete NAME``."""
    with _client(args) as client:
        client.delete(args.name, args.version)
    print(f"deleted {args.name}" + (f" version {args.version}" if args.version else ""))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """``registry keys``: the registry's trusted public keys as PEM."""
    with _client(args) as client:
        for key in client.signing_keys():
            print(f"# key id {key.key_id}")
            sys.stdout.write(key.to_pem().decode("ascii"))
    return 0


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except IntegrityError as error:
            print(f"tensafe registry: verification failed: {error.message}", file=sys.stderr)
            return 3
        except TenSafeError as error:
            print(f"tensafe registry: {error.message}", file=sys.stderr)
            return 2
        except (OSError, KeyError) as error:
            print(f"tensafe registry: {error}", file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``registry`` command group to the ``tensafe`` parser's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "registry", help="TGSP adapter packages: inspect, verify, import, publish, download"
    )
    sub = parser.add_subparsers(dest="registry_command", required=True)

    def command(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> Any:
        child = sub.add_parser(name, help=help)
        child.add_argument("--connection-file", help="default: .tensafe/connection.json")
        child.set_defaults(func=_guarded(run))
        return child

    def selector(child: Any) -> None:
        group = child.add_mutually_exclusive_group()
        group.add_argument("--version", type=int, default=0, help="default: the latest")
        group.add_argument("--alias", help="e.g. prod")

    inspect = command("inspect", "print a package's manifest (offline, unverified)", cmd_inspect)
    inspect.add_argument("file")
    verify = command("verify", "verify a package's signature and digests", cmd_verify)
    verify.add_argument("file")
    verify.add_argument("--key", action="append", help="trusted public key PEM (repeatable)")
    verify.add_argument("--tenant", help="the tenant the package must belong to")
    seal = command("import", "seal a PEFT adapter directory as a TGSP package", cmd_import)
    seal.add_argument("directory")
    seal.add_argument("--name", required=True, help="adapter name ([A-Za-z0-9._-])")
    seal.add_argument("--output", "-o", required=True, help="package file to create")
    seal.add_argument("--adapter-version", default="1", help="version label in the manifest")
    seal.add_argument("--base-model-id", help="default: the config's base_model_name_or_path")
    seal.add_argument(
        "--base-model-sha256", required=True, help="hex SHA-256 identifying the base weights"
    )
    seal.add_argument("--tenant", help="default: the API key's tenant")
    seal.add_argument("--kek-dir", help="KEK folder (default: the dev stack's registry)")
    seal.add_argument("--signing-key", help="PEM signing key (default: the dev stack's)")
    seal.add_argument("--create-kek", action="store_true", help="create the tenant's KEK")
    seal.add_argument("--publish", action="store_true", help="then publish it")
    publish = command("publish", "upload a package as a new version", cmd_publish)
    publish.add_argument("file")
    publish.add_argument("--name", help="default: the adapter id in the manifest")
    publish.add_argument("--request-id", help="idempotency key")
    download = command("download", "download a verified package", cmd_download)
    download.add_argument("name")
    download.add_argument("--output", "-o", required=True)
    selector(download)
    export = command("export", "download, decrypt and write a PEFT directory", cmd_export)
    export.add_argument("name")
    export.add_argument("--output", "-o", required=True, help="directory to create")
    selector(export)
    command("list", "list the tenant's adapters", cmd_list)
    versions = command("versions", "list an adapter's versions", cmd_versions)
    versions.add_argument("name")
    alias = command("alias", "point an alias at a version", cmd_alias)
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    delete = command("delete", "delete a version (or the adapter)", cmd_delete)
    delete.add_argument("name")
    delete.add_argument("--version", type=int, default=0, help="default: every version")
    command("keys", "print the registry's trusted public keys", cmd_keys)
    return parser
