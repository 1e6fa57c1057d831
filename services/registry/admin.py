"""``python -m tensafe.registry.admin``: operator commands that touch the registry's keys.

``create-tenant-kek TENANT`` creates a tenant's key-encryption key with the configured
KEK provider (``TENSAFE_KEK_PROVIDER``: generated inside the PKCS#11 token, or in dev
mode a file in ``TENSAFE_REGISTRY_KEK_DIR``). It is the one path that creates a KEK:
the registry never generates one on its own, and refuses to replace an existing one.
``public-key`` prints the registry's signing public key (PEM) for third parties and for
other deployments' trusted-key lists.

``rotate-kek TENANT`` gives the tenant a new KEK version and re-wraps every stored
package's data key under it (:mod:`tensafe.registry.domain.rotation`); run again after
an interruption, it resumes. ``kek-usage TENANT`` lists each KEK version with the
versions that need it, and ``destroy-kek TENANT KEK_ID`` destroys an old version that
no package needs. They use the registry's own settings (database, objects, KEK provider).

Exit codes: 0 done, 2 bad setting or input, 3 the tenant already has a KEK, 4 the KEK
version is still needed (or is the current one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tensafe.common.config import load_config
from tensafe.common.db import Database
from tensafe.common.errors import AlreadyExists, ConfigError, FailedPrecondition, TenSafeError
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.keys import load_signing_keys
from tensafe.registry.domain.rotation import KekRotations
from tensafe.registry.store.objects import LocalObjectStore
from tensafe.registry.store.sql import RegistryStore


def main(argv: Sequence[str] | None = None) -> int:
    """Run one operator command; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tensafe.registry.admin")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-tenant-kek", help="create a tenant's KEK (once)")
    create.add_argument("tenant_id")
    sub.add_parser("public-key", help="print the registry's signing public key (PEM)")
    rotate = sub.add_parser("rotate-kek", help="new KEK version; re-wrap every package (resumes)")
    rotate.add_argument("tenant_id")
    usage = sub.add_parser("kek-usage", help="each KEK version and the versions needing it")
    usage.add_argument("tenant_id")
    destroy = sub.add_parser("destroy-kek", help="destroy a KEK version no package needs")
    destroy.add_argument("tenant_id")
    destroy.add_argument("kek_id")
    args = parser.parse_args(argv)
    try:
        config = load_config(RegistryConfig)
        if args.command == "create-tenant-kek":
            provider = config.open_kek_provider(config.kek_dir)
            try:
                kek_id = provider.create_tenant_kek(args.tenant_id)
            finally:
                provider.close()
            print(f"created KEK {kek_id} for tenant {args.tenant_id} ({config.kek_provider})")
            return 0
        if args.command in ("rotate-kek", "kek-usage", "destroy-kek"):
            return asyncio.run(_rotation_command(config, args))
        keys = load_signing_keys(
            signing_key_file=config.registry_signing_key_file,
            trusted_key_files=config.registry_trusted_signing_key_files,
            dev_mode=config.dev_mode,
            data_dir=Path(config.data_dir),
        )
        sys.stdout.write(keys.signing_key.verifying_key.to_pem().decode("ascii"))
        return 0
    except AlreadyExists as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 3
    except FailedPrecondition as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 4
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TenSafeError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2


async def _rotation_command(config: RegistryConfig, args: argparse.Namespace) -> int:
    keys = load_signing_keys(
        signing_key_file=config.registry_signing_key_file,
        trusted_key_files=config.registry_trusted_signing_key_files,
        dev_mode=config.dev_mode,
        data_dir=Path(config.data_dir),
        trust_list_file=config.registry_trust_list_file,
    )
    provider = config.open_kek_provider(config.kek_dir)
    database = Database.from_url(config.database_url, application_name="tensafe-registry-admin")
    try:
        store = RegistryStore(database)
        await store.migrate()
        rotations = KekRotations(
            store=store,
            objects=LocalObjectStore(config.object_dir),
            keys=keys,
            kek_provider=provider,
        )
        if args.command == "rotate-kek":
            report = await rotations.rotate(args.tenant_id)
            print(
                json.dumps(
                    {
                        "tenant_id": report.tenant_id,
                        "kek_id": report.kek_id,
                        "resumed": report.resumed,
                        "rewrapped": report.rewrapped,
                        "pinned_by_format_1": list(report.pinned),
                        "kek_ids": list(report.kek_ids),
                    },
                    indent=2,
                )
            )
        elif args.command == "kek-usage":
            print(json.dumps(await rotations.usage(args.tenant_id), indent=2))
        else:
            await rotations.destroy(args.tenant_id, args.kek_id)
            print(f"destroyed KEK {args.kek_id} of tenant {args.tenant_id}")
        return 0
    finally:
        await database.dispose()
        provider.close()


if __name__ == "__main__":
    sys.exit(main())
