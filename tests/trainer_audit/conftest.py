"""Fixtures of the audit tests: the trainer service's real stack (tiny model, nats-server,
SQLite, auth interceptor) is reused as is."""

from __future__ import annotations

from tests.trainer_service.conftest import (  # noqa: F401  (pytest fixtures)
    base_models_dir,
    make_stack,
    nats_server,
    single_torch_thread,
)
