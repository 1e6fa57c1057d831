"""``python -m tensafe.auth.bootstrap``: create the first admin of a fresh deployment.

Run once against the auth service's database (the same ``TENSAFE_*`` settings as the
service: ``TENSAFE_DATABASE_URL``, ``TENSAFE_DATA_DIR``, and
``TENSAFE_SIGNING_KEY_ENCRYPTION_KEY`` or ``TENSAFE_DEV_MODE=1``). It creates the platform
tenant, an admin user with an API key, and optionally service accounts (reader role)
for the other services, and prints the keys **once**. It refuses, with exit code 3, when
a platform admin exists already: there is no default password and no second bootstrap.

``tensafe admin bootstrap`` runs this module.

Exit codes: 0 created; 2 configuration error; 3 already bootstrapped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tensafe.auth.config import AuthConfig
from tensafe.auth.domain.service import BootstrapResult
from tensafe.auth.server import build_domain
from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError, FailedPrecondition, InvalidArgument

EXIT_ALREADY_BOOTSTRAPPED = 3


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the bootstrap command."""
    parser = argparse.ArgumentParser(
        prog="tensafe admin bootstrap", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--tenant-name", default="platform", help="platform tenant's name")
    parser.add_argument("--admin-name", default="admin", help="first admin user's name")
    parser.add_argument(
        "--service-account",
        action="append",
        default=[],
        metavar="NAME",
        help="also create a service account (reader) with a key; repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--credentials-file",
        help="write the result as JSON to this new file (mode 0600) instead of stdout",
    )
    return parser


def result_json(result: BootstrapResult) -> dict[str, object]:
    """The bootstrap result as a JSON object (contains secrets)."""
    return {
        "tenant_id": result.tenant.id,
        "admin_principal_id": result.admin.id,
        "api_key": result.admin_api_key,
        "service_api_keys": result.service_api_keys,
    }


async def _run(config: AuthConfig, args: argparse.Namespace) -> BootstrapResult:
    components = await build_domain(config)
    try:
        return await components.domain.bootstrap(
            tenant_name=args.tenant_name,
            admin_name=args.admin_name,
            service_accounts=args.service_account,
        )
    finally:
        await components.database.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(AuthConfig)
        result = asyncio.run(_run(config, args))
    except ConfigError as error:
        print(f"tensafe admin bootstrap: configuration error: {error}", file=sys.stderr)
        return 2
    except InvalidArgument as error:
        print(f"tensafe admin bootstrap: {error.message}", file=sys.stderr)
        return 2
    except FailedPrecondition as error:
        print(f"tensafe admin bootstrap: refused: {error.message}", file=sys.stderr)
        return EXIT_ALREADY_BOOTSTRAPPED
    document = result_json(result)
    if args.credentials_file:
        path = Path(args.credentials_file)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(document, file, indent=2)
        print(f"credentials written to {path} (mode 0600); they are not stored anywhere else")
    elif args.json:
        print(json.dumps(document, indent=2))
    else:
        print(f"platform tenant: {result.tenant.id}")
        print(f"admin principal: {result.admin.id} ({result.admin.name})")
        print(f"admin API key (shown once, store it now): {result.admin_api_key}")
        for name, key in result.service_api_keys.items():
            print(f"service account {name} API key: {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
