"""The package version, readable without importing the package (setup.cfg reads it; saved models record it)."""

__version__ = "0.1.0"
