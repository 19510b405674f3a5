"""Pruning: magnitude, iterative magnitude (reset / rewind), movement and soft movement.

One file per method behind the small ``Pruner`` interface (``base.py``); one
masking mechanism (``masks.py``); one schedule (``schedule.py``); the
host-facing ``PruningMethod`` (``method.py``) owns masks and ramp; its policy
section is ``settings.py``.  This file stays torch-free: it only registers.
"""

from spu_engine.methods.pruning.settings import Pruning
from spu_engine.methods.spec import ConsoleField, MethodSpec, SectionSpec

SPEC = MethodSpec(
    "pruning",
    SectionSpec(
        "pruning",
        Pruning,
        title="Pruning",
        fields=(
            ConsoleField("method", "pr-method", "method"),
            ConsoleField("scope", "pr-scope", "scope"),
            ConsoleField("structure", "pr-structure", "structure"),
            ConsoleField("schedule.final_sparsity", "pr-target", "target"),
            ConsoleField("schedule.start_step", "pr-start", "start step"),
            ConsoleField("schedule.end_step", "pr-end", "end step", unset="run's end"),
        ),
    ),
    "spu_engine.methods.pruning.method:PruningMethod",
)
