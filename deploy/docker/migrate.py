"""Bring the schema of one or more TenSafe services to the newest revision.

The Helm chart runs this in its pre-install/pre-upgrade Job so that a release's pods
start on a migrated schema; each service also migrates at start-up (idempotent), so
running this twice, or before a service, changes nothing. Each service keeps its own
Alembic version table, so the services may share one database or use one each.

Usage (in the image)::

    TENSAFE_DATABASE_URL=postgresql+asyncpg://... python /opt/tensafe/migrate.py trainer

Exit codes: 0 migrated (or already at head), 2 bad arguments or settings, 1 failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from tensafe.common.db import migrate
from tensafe.common.errors import TenSafeError

# service -> (migrations folder, version table).
MIGRATIONS: dict[str, tuple[str, str]] = {
    "auth": ("tensafe.auth.store:migrations", "alembic_version_auth"),
    "he_runtime": ("tensafe.he_runtime.store:migrations", "alembic_version_he_runtime"),
    "registry": ("tensafe.registry.store:migrations", "alembic_version_registry"),
    "trainer": ("tensafe.trainer.store:migrations", "alembic_version_trainer"),
}


async def _run(service: str, database_url: str) -> str | None:
    script_location, version_table = MIGRATIONS[service]
    return await migrate(database_url, script_location=script_location, version_table=version_table)


def main(argv: list[str] | None = None) -> int:
    """Migrate the services named in ``argv`` against ``$TENSAFE_DATABASE_URL``.

    Returns:
        The process exit code (see the module docstring).
    """
    parser = argparse.ArgumentParser(description="Migrate TenSafe service schemas.")
    parser.add_argument("services", nargs="+", choices=sorted(MIGRATIONS))
    args = parser.parse_args(argv)
    database_url = os.environ.get("TENSAFE_DATABASE_URL", "").strip()
    if not database_url:
        print("migrate: TENSAFE_DATABASE_URL is required", file=sys.stderr)
        return 2
    for service in args.services:
        try:
            revision = asyncio.run(_run(service, database_url))
        except TenSafeError as error:
            print(f"migrate: {service}: {error}", file=sys.stderr)
            return 1
        print(f"migrate: {service} at revision {revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
