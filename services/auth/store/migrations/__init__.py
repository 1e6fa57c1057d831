"""Alembic migrations of the auth service (run by ``tensafe.common.db.migrate``)."""
