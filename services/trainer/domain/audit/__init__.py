"""Empirical one-run privacy audit of the DP-SGD code path (Steinke, Nasr, Jagielski 2023)."""
