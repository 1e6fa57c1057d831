"""Revisions of the HE runtime schema."""
