"""``spu``: the headless command line (train, engine, runs, report, export, eval, ablate, policy).

The commands live in ``train`` (train, engine), ``tools`` (runs, ablate, report, export, eval) and ``policy``
(policy validate, policy schema); importing this package registers them all on ``app``, the ``spu`` entry point.
"""

from __future__ import annotations

from spu_engine.cli import (
    policy,  # noqa: F401
    tools,  # noqa: F401
    train,  # noqa: F401  # the modules register their commands; in this order, the order of `spu --help`
)
from spu_engine.cli.app import app, main

__all__ = ["app", "main"]
