"""A tiny service schema for the migration tests, laid out like a service's store package."""
