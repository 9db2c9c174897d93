"""Tests of lorakit.train (a package, so that its conftest never shadows tests/conftest.py)."""
