"""Throw-away PostgreSQL databases on the machine's server.

Each database gets a unique name and is created through a maintenance database with
AUTOCOMMIT: ``postgres``, or ``test`` where ``postgres`` does not exist, or only
``TENSAFE_TEST_POSTGRES_URL`` (an asyncpg URL of a maintenance database) when that is
set. Tests are skipped, with the reason, only when no maintenance database is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

POSTGRES_ADMIN_URLS = (
    [os.environ["TENSAFE_TEST_POSTGRES_URL"]]
    if os.environ.get("TENSAFE_TEST_POSTGRES_URL")
    else [
        "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    ]
)


@dataclass(frozen=True)
class PostgresDatabase:
    """A database created for a test and the maintenance database that created it."""

    admin_url: str
    name: str

    @property
    def url(self) -> str:
        """The database's own URL (same server and user as ``admin_url``)."""
        return (
            make_url(self.admin_url).set(database=self.name).render_as_string(hide_password=False)
        )


async def admin_execute(admin_url: str, statement: str) -> None:
    """Run one statement (``CREATE DATABASE`` cannot run in a transaction) with AUTOCOMMIT.

    Args:
        admin_url: URL of a maintenance database.
        statement: The SQL statement.
    """
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(sa.text(statement))
    finally:
        await engine.dispose()


async def create_database(prefix: str) -> PostgresDatabase:
    """Create an empty database named ``<prefix>_<12 hex digits>``.

    Args:
        prefix: The start of the name, saying which tests made it.

    Returns:
        The new database.

    Raises:
        pytest.skip.Exception: No maintenance database is reachable.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    unreachable: list[str] = []
    for admin_url in POSTGRES_ADMIN_URLS:
        try:
            await admin_execute(admin_url, f'CREATE DATABASE "{name}"')
            return PostgresDatabase(admin_url=admin_url, name=name)
        except (OSError, TimeoutError) as error:
            unreachable.append(f"{admin_url}: {error}")
        except sa_exc.DBAPIError as error:
            # The maintenance database itself may not exist; try the next one.
            if "does not exist" not in str(error):
                raise
            unreachable.append(f"{admin_url}: {error.orig}")
    pytest.skip("PostgreSQL unreachable: " + "; ".join(unreachable))


async def drop_database(database: PostgresDatabase) -> None:
    """Drop ``database``, closing the connections still open to it.

    Args:
        database: A database made by :func:`create_database`.
    """
    await admin_execute(
        database.admin_url, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)'
    )


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[PostgresDatabase]:
    """A database for the ``with`` block, dropped afterwards (for synchronous fixtures).

    Args:
        prefix: The start of the name, saying which tests made it.

    Yields:
        The new database.
    """
    database = asyncio.run(create_database(prefix))
    try:
        yield database
    finally:
        asyncio.run(drop_database(database))
