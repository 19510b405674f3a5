"""How often the console may redraw while the user only watches.

Engine events only mark views dirty; a frame draws them.  On a machine whose
cores are all training, every millisecond the console spends is taken from a
step (with two threads, a preempted one stalls the other at the next sync), so
frames of training progress are spaced by what the console really spends: if
it used ``c`` seconds of CPU from one such frame to the next (drawing, Textual's
compositing, reading events), the next frame starts ``c / share`` seconds after
the last, which holds the console near ``share`` of one core while the user
watches.  What a key press or the engine's answer to it changed (a row's mark)
is drawn at once and is not budgeted; the rest follows at the next such frame,
which leaves the user a moment after each answer for the next key.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

DEFAULT_SHARE = 0.015  # of one core: 1.5 %
FASTEST = 0.25  # seconds between frames: plots redraw at most ~4 Hz
SLOWEST = 5.0  # seconds: nothing on screen is older than this while training
RECENT = 5  # frames whose mean cost counts (a median would hold the console above its share: most frames are cheap,
# every few draws a plot)
CAPPED = 3.0  # ... each at most this many times the median: one costly frame (a resize) barely slows the screen
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
        self._due = 0.0  # monotonic time before which no frame of training progress starts
        self._held = 0.0  # ... nor before this one (while a key's mark is on its way)
        self._turn = 0.0  # ... nor before this one (just after the user's change was answered)
        self._cpu_at_start: float | None = None  # process CPU when the last such frame began (None: start a new count)

    def spent(self, cpu_seconds: float) -> None:
        """Record the CPU used from one frame's start to the next one's."""
        self.costs.append(cpu_seconds)

    @property
    def interval(self) -> float:
        """Seconds from one frame's start to the next one's."""
        if not self.costs:
            return self.fastest
        typical = statistics.median(self.costs)
        cost = statistics.fmean(min(c, CAPPED * typical) for c in self.costs)
        return min(self.slowest, max(self.fastest, cost / self.share))

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
        """A frame of training progress (``measured``) spaces the next by the CPU used since the last one began:
        its drawing, Textual's compositing, reading events.  A frame that answers the user ends the count, since
        the user's own actions are not the watching budget's."""
        if not measured:
            self._cpu_at_start = None
            return
        cpu = time.process_time()
        if self._cpu_at_start is not None:
            self.spent(cpu - self._cpu_at_start)
        self._cpu_at_start = cpu
        self._due = time.monotonic() + self.interval
