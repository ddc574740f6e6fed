"""The package version (state files record it)."""

__version__ = "0.2.0"
