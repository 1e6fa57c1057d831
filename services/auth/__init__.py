"""The auth service: tenants, principals, API keys, access tokens, the audit chain."""
