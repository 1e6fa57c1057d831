"""Revisions of the sample service."""
