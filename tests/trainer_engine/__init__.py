"""Tests of the LoRA training engine and the tiny model builder."""
