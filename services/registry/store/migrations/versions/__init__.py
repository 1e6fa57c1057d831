"""Revisions of the registry schema."""
