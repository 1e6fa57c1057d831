"""``python -m tensafe.registry.admin``: operator commands that touch the registry's keys.

``create-tenant-kek TENANT`` creates a tenant's key-encryption key with the configured
KEK provider (``TENSAFE_KEK_PROVIDER``: generated inside the PKCS#11 token, or in dev
mode a file in ``TENSAFE_REGISTRY_KEK_DIR``). It is the one path that creates a KEK:
the registry never generates one on its own, and refuses to replace an existing one.
``public-key`` prints the registry's signing public key (PEM) for third parties and for
other deployments' trusted-key lists.

Exit codes: 0 done, 2 bad setting or input, 3 the tenant already has a KEK.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tensafe.common.config import load_config
from tensafe.common.errors import AlreadyExists, ConfigError, TenSafeError
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.keys import load_signing_keys


def main(argv: Sequence[str] | None = None) -> int:
    """Run one operator command; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tensafe.registry.admin")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-tenant-kek", help="create a tenant's KEK (once)")
    create.add_argument("tenant_id")
    sub.add_parser("public-key", help="print the registry's signing public key (PEM)")
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
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TenSafeError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
