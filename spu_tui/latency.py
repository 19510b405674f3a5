"""Round trips of the user's changes, timed where the console draws their answers (read by bench/ui_latency.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RoundTrips:
    """Seconds from the key press to the redraw that shows the engine's answer."""

    received: list[float] = field(default_factory=list)  # key -> engine received -> redraw
    applied: list[tuple[float, float]] = field(
        default_factory=list
    )  # (key -> engine ack -> redraw, engine ack -> redraw)

    def received_drawn(self, sent: float) -> None:
        """Call after the refresh that shows the engine has the change sent at ``sent`` (``time.perf_counter``)."""
        self.received.append(time.perf_counter() - sent)

    def applied_drawn(self, sent: float, ack_t: float) -> None:
        """Call after the refresh that shows the change applied; ``ack_t`` is the engine's wall-clock time of the ack."""
        self.applied.append((time.perf_counter() - sent, time.time() - ack_t))
