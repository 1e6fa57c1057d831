"""Fixtures shared by every test package."""

from __future__ import annotations

import os

# Tests never export traces, whatever the developer's shell says.
os.environ.pop("TENSAFE_OTEL_EXPORTER", None)
