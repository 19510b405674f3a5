"""Selective-update methods, registered in one place.

Each method reads one policy section.  A section whose settings are not the
defaults but that no registered method implements is refused by the engine
with a clear message rather than silently ignored.
"""

from __future__ import annotations

from .base import Method

METHODS: list[type[Method]] = []

__all__ = ["METHODS", "Method"]
