"""Adapters of the registry: the SQL metadata store and the package object store."""
