"""Alembic migrations of the registry service (run by ``tensafe.common.db.migrate``)."""
