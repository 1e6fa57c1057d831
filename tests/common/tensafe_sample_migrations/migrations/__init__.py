"""Alembic script directory of the sample service (versions/ holds the revisions)."""
