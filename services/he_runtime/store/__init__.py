"""Adapters of the HE runtime: the SQL session store and the Galois-key files."""
