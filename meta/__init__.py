"""Fake implementations, registered on import."""

from . import group_norm  # noqa: F401
