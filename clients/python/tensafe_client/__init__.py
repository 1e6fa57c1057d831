"""TenSafe Python SDK."""
