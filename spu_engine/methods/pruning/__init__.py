"""Pruning: magnitude, iterative magnitude (reset / rewind), movement and soft movement.

One file per method behind the small ``Pruner`` interface (``base.py``); one
masking mechanism (``masks.py``); one schedule (``schedule.py``); the
host-facing ``PruningMethod`` (``method.py``) owns masks and ramp.
"""

from .method import PRUNERS, PruningMethod

__all__ = ["PRUNERS", "PruningMethod"]
