"""The engine's own rate for the commands that cost a run time: a checkpoint (weights and optimizer written) and an
evaluation (a pass over the eval set).

The socket's per-connection limits allow ten commands a second, and many connections; a checkpoint a step stalls
training all the same.  So each such command has one token bucket for the whole engine, spent only by the work it
really does (a checkpoint of a step already written costs nothing: ``commands.Commands`` answers it at once).  Past
the bucket the command is refused with when to try again.  The bucket's clock is the boundary's time as rank 0 read
it, so every rank of a multi-process run refuses the same commands.
"""

from __future__ import annotations

import math

from spu_engine.loop.lifecycle import CommandRefused

CHECKPOINT_BURST, CHECKPOINT_EVERY_S = 3, 10.0  # three at once, then one every ten seconds
EVALUATE_BURST, EVALUATE_EVERY_S = 3, 10.0


class CommandRate:
    """A token bucket of ``burst`` commands, one more every ``every_s`` seconds of the boundary clock."""

    def __init__(self, what: str, burst: int, every_s: float) -> None:
        self.what, self.burst, self.every_s = what, burst, every_s
        self.tokens, self.at = float(burst), None

    def take(self, now: float) -> None:
        """Spend one; CommandRefused, saying when to retry, when none is left."""
        if self.at is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) / self.every_s)
        self.at = now
        if self.tokens < 1.0:
            wait = math.ceil((1.0 - self.tokens) * self.every_s)
            raise CommandRefused(
                f"{self.what} refused: the engine does at most {self.burst} in a row, then one every "
                f"{self.every_s:g} s, so that training goes on; try again in {wait} s"
            )
        self.tokens -= 1.0
