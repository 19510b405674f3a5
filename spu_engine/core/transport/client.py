"""The client end of the engine's socket: what the console and the tests connect with.

One JSON object per line each way.  A reader thread turns lines into events on
a queue (or hands them to a callback); ``send`` returns the id the engine's
``received`` and ``ack`` events echo.  Torch-free: the console imports it.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spu_engine.core.protocol.codec import encode, event

MAX_SOCKET_PATH = 100  # AF_UNIX addresses hold 107 bytes on Linux


def socket_address(path: Path) -> tuple[str, int | None]:
    """An AF_UNIX address for ``path``; a path too long for one is reached through its folder's fd (Linux)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


class EngineClient:
    """Connects to an engine's socket; events arrive on a queue (or a callback) from a reader thread."""

    def __init__(self, path: str | Path, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(path)
        self.on_event = on_event
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.hello: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self.connected = False

    def connect(self, timeout: float = 30.0) -> EngineClient:
        """Connect, retrying until the socket exists and answers (an engine may still be starting)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                address, dir_fd = socket_address(self.path)
                try:
                    s.connect(address)
                finally:
                    if dir_fd is not None:
                        os.close(dir_fd)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                last = exc
                s.close()
                time.sleep(0.1)
                continue
            self._sock = s
            self.connected = True
            self._reader = threading.Thread(target=self._read_loop, name="spu-client", daemon=True)
            self._reader.start()
            return self
        raise ConnectionError(f"no engine answers on {self.path} ({last})")

    def _read_loop(self) -> None:
        sock = self._sock  # held here: close() from another thread drops the attribute, the recv below then ends
        assert sock is not None
        buf = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line:
                        continue
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue  # never lose the connection over one unreadable line
                    self._deliver(ev)
        except OSError:
            pass
        finally:
            self.connected = False
            self._deliver(event("disconnected", message=f"engine socket {self.path} closed"))

    def _deliver(self, ev: dict[str, Any]) -> None:
        if ev.get("type") == "hello":
            self.hello = ev
        if self.on_event is not None:
            self.on_event(ev)
        else:
            self.events.put(ev)

    def send(self, cmd: str, **fields: Any) -> str:
        """Send a command; returns its id (echoed by the engine's ack)."""
        cid = f"c{next(self._ids)}"
        self.send_raw(encode({"cmd": cmd, "id": cid, **fields}))
        return cid

    def send_raw(self, data: bytes) -> None:
        if self._sock is None:
            raise ConnectionError("not connected")
        self._sock.sendall(data)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """Next event matching ``predicate`` (events before it are consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching event in time")
            try:
                ev = self.events.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError("no matching event in time") from None
            if predicate(ev):
                return ev
            if ev.get("type") == "disconnected":
                raise ConnectionError(ev["message"])

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
