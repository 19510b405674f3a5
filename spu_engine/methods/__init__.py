"""Selective-update methods, one package each, registered in ``registry.py``.

Each method reads one policy section.  A section whose settings are not the
defaults but that no registered method implements is refused by the engine
with a clear message rather than silently ignored.

This package stays torch-free (the policy and the console import it): the
registry holds specs, and an implementation is imported when a host builds it.
"""

from __future__ import annotations

from spu_engine.methods.registry import METHODS, SPECS, ablated_method, method_classes, section_specs

__all__ = ["METHODS", "SPECS", "ablated_method", "method_classes", "section_specs"]
