"""Storage of the auth service (SQLAlchemy Core on SQLite and PostgreSQL)."""
