"""One client connection of the engine's socket: its buffers and its rate limits (token buckets).

Each limit is a sustained rate with a burst; past one, the server stops reading that socket for a while, so a flooding
client waits on its own writes instead of slowing training.
"""

from __future__ import annotations

import socket
import time
from collections import deque

CLIENT_BUFFER_BYTES = 4 << 20
MAX_CLIENTS = 128  # connections at once; each may hold CLIENT_BUFFER_BYTES of unsent events
# per connection, sustained rate and burst: any line (parsed and answered here), bytes, commands the engine applies,
# and hello (a full snapshot; a console needs one when it connects, which the server sends unasked)
LINE_RATE, LINE_BURST = 50.0, 1000.0
BYTE_RATE, BYTE_BURST = float(4 << 20), float(16 << 20)
COMMAND_RATE, COMMAND_BURST = 10.0, 50.0
HELLO_RATE, HELLO_BURST = 2.0, 10.0


class Bucket:
    """Token bucket: ``rate`` per second, at most ``burst`` saved up; spending past zero is debt paid by waiting."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def spend(self, n: float) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - n
        self.at = now

    def wait(self) -> float:
        """Seconds until the bucket is out of debt (0 if it is not in debt)."""
        return max(0.0, -(self.tokens + (time.monotonic() - self.at) * self.rate) / self.rate)


class Connection:
    """One client's socket, its buffers both ways and its rate limits."""

    def __init__(self, sock: socket.socket, cid: int) -> None:
        self.sock = sock
        self.id = cid
        self.rbuf = bytearray()
        self.wbuf: deque[bytes] = deque()
        self.wbytes = 0
        self.partial = False  # wbuf[0] is the rest of a line already half sent: it must go out whole
        self.discarding = False  # inside an over-long line: skip to its newline
        self.lines = Bucket(LINE_RATE, LINE_BURST)
        self.bytes = Bucket(BYTE_RATE, BYTE_BURST)
        self.commands = Bucket(COMMAND_RATE, COMMAND_BURST)
        self.hellos = Bucket(HELLO_RATE, HELLO_BURST)
        self.held_until = 0.0  # over its rate: not read until then (monotonic time)
        self.blocked = False  # its socket buffer is full: flushed again when the selector says writable
        self.interest = 0  # selector events registered for it
