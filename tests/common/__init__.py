"""Tests of tensafe.common (a package so test module names stay unique across tests/)."""
