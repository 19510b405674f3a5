"""How often the console may redraw while the user only watches.

Engine events only mark views dirty; a frame draws them.  On a machine whose
cores are all training, every millisecond the console spends is taken from a
step (with two threads, a preempted one stalls the other at the next sync), so
frames of training progress are spaced by what the console really spends: the
CPU it used (drawing, Textual's compositing, reading events) is held to
``share`` of one core over any stretch of watching, as a token bucket.  Each
second earns ``share`` CPU seconds; each frame waits until it has earned what a
frame costs (the mean of the last few) and a part of any debt.  Credit is
capped at one frame's cost (no burst of frames after a quiet spell), debt at
one slowest interval (a rare costly frame slows the next ones a little, not the
whole minute).  What a key press or the engine's answer to it changed (a row's
mark) is drawn at once and is not budgeted; the rest follows at the next such
frame, which leaves the user a moment after each answer for the next key.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

DEFAULT_SHARE = 0.015  # of one core: 1.5 %
FASTEST = 0.25  # seconds between frames: plots redraw at most ~4 Hz
SLOWEST = 5.0  # seconds: nothing on screen is older than this while training
RECENT = 5  # frames whose mean cost is a frame's expected cost (most frames are cheap, every few draws a plot)
COALESCE = 0.01  # seconds a due frame still waits, so that a burst of events is drawn once
KEY_FIRST = 0.5  # seconds at most a frame waits after a key for the engine's "received" mark to be drawn before it
USER_TURN = 0.3  # seconds a frame waits after the engine's answer to a key is drawn: the user's next key may come


class FrameBudget:
    """The spacing of frames that keeps the console at ``share`` of one core."""

    def __init__(self, share: float = DEFAULT_SHARE, fastest: float = FASTEST, slowest: float = SLOWEST) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share {share}: a fraction of one core in (0, 1]")
        self.share = share
        self.fastest = fastest
        self.slowest = slowest
        self.costs: deque[float] = deque(maxlen=RECENT)  # CPU seconds between the latest frames
        self.balance = 0.0  # CPU seconds earned (share x time) less spent, since the count began
        self._due = 0.0  # monotonic time before which no frame of training progress starts
        self._held = 0.0  # ... nor before this one (while a key's mark is on its way)
        self._turn = 0.0  # ... nor before this one (just after the user's change was answered)
        self._last: tuple[float, float] | None = None  # (monotonic, process CPU) at the last such frame's start

    def spent(self, cpu_seconds: float, seconds: float) -> None:
        """Record the CPU used over the ``seconds`` from one frame's start to the next one's."""
        self.costs.append(cpu_seconds)
        earned = self.balance + self.share * seconds - cpu_seconds
        self.balance = min(self.cost, max(-self.share * self.slowest, earned))

    @property
    def cost(self) -> float:
        """CPU seconds a frame takes, from one frame's start to the next one's (the mean of the latest)."""
        return statistics.fmean(self.costs) if self.costs else 0.0

    @property
    def interval(self) -> float:
        """Seconds from one frame's start to the next one's: long enough to earn a frame's cost and a share of the
        debt (or spend a share of the credit): a costly frame slows the next few a little, not one a lot."""
        if not self.costs:
            return self.fastest
        return min(self.slowest, max(self.fastest, (self.cost - self.balance / RECENT) / self.share))

    def wait(self) -> float:
        """Seconds until the next frame of training progress may start."""
        return max(COALESCE, max(self._due, self._held, self._turn) - time.monotonic())

    def key_pressed(self) -> None:
        """A key sent a change: the next frame waits for its mark (``marks_drawn``; at most ``KEY_FIRST``, for an
        engine that never says it received it), so that the refresh after the engine's answer (within milliseconds)
        draws the key's mark alone, not behind the tree, the plots and the log."""
        self._held = time.monotonic() + KEY_FIRST

    @property
    def held(self) -> bool:
        return self._held > time.monotonic()

    def answered(self) -> None:
        """The engine's answer to the user's change is on screen: progress waits ``USER_TURN``, so that the next key
        of someone toggling row after row is drawn at once, not behind a whole-screen redraw that started a moment
        before it.  Progress follows when the keys pause."""
        self._turn = time.monotonic() + USER_TURN

    def marks_drawn(self) -> None:
        """The keys' marks are on screen: frames keep their own pace again."""
        self._held = 0.0

    def frame_started(self, measured: bool) -> None:
        """A frame of training progress (``measured``) pays for the CPU used since the last one began: its
        drawing, Textual's compositing, reading events.  A frame that answers the user ends the count, since
        the user's own actions are not the watching budget's."""
        if not measured:
            self._last = None
            return
        now, cpu = time.monotonic(), time.process_time()
        if self._last is None:
            self.balance = 0.0
        else:
            self.spent(cpu - self._last[1], now - self._last[0])
        self._last = (now, cpu)
        self._due = now + self.interval
