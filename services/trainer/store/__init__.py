"""The trainer's database: SQLAlchemy models, Alembic migrations and the store."""
