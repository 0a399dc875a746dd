"""The package version (also stored in every checkpoint's metadata)."""

__version__ = "0.2.0"
