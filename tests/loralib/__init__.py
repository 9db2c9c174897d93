"""Tests of lorakit.loralib (a package, so that its helper module imports relatively)."""
