"""Alembic migrations of the HE runtime service (run by ``tensafe.common.db.migrate``)."""
