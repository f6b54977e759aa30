"""Backends: where generations run (in process or on a server)."""

from .base import Backend

__all__ = ["Backend"]
