"""The engine's end of its Unix socket: many clients, none of which can slow training.

The training loop owns the main thread; one server thread multiplexes every
client with ``selectors``.  Each client has a bounded outgoing buffer: when a
slow client falls behind, its oldest lines are dropped (it can rebuild history
from ``events.jsonl``) so the engine never waits for anyone.  Incoming lines
are size-capped and validated; a bad one gets an ``error`` event and nothing
else happens.  Each connection has rate limits (lines, bytes, commands for the
engine, hello): past one the server stops reading that socket for a while, so
a flooding client waits on its own writes instead of slowing training.
``hello`` is answered here from a snapshot shared by every request between two
events; it never reaches the engine or events.jsonl.  Neither does the
``heartbeat`` this thread sends when nothing else went out for ``HEARTBEAT_S``:
a console that hears nothing at all knows the engine is silent, not quiet.

Security: the run folder is 0700 and every file the engine writes is private
(umask 077); the socket is 0600 and a peer of another user is refused by its
kernel-reported credentials (SO_PEERCRED), whatever the file modes say.
"""

from __future__ import annotations

import itertools
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from spu_engine.core.protocol.codec import MAX_LINE_BYTES, ProtocolError, encode, event, parse_command
from spu_engine.core.protocol.events import HEARTBEAT_S
from spu_engine.core.transport.client import socket_address
from spu_engine.core.transport.connection import CLIENT_BUFFER_BYTES, MAX_CLIENTS, Connection


class EngineServer:
    """Accepts clients on ``control.sock``; broadcasts events; forwards parsed commands."""

    def __init__(
        self,
        path: Path,
        on_command: Callable[[Any, int], None],
        hello: Callable[[], dict[str, Any]],
        buffer_bytes: int = CLIENT_BUFFER_BYTES,
    ) -> None:
        self.path = path
        self.on_command = on_command
        self.hello = hello
        self.buffer_bytes = buffer_bytes
        self._clients: dict[int, Connection] = {}
        self._snapshot: tuple[int, float, bytes] | None = (
            None  # (events generation, time, hello without its closing brace)
        )
        self._generation = 0  # bumped by every broadcast: a snapshot is shared only between two events
        self._sent_at = time.monotonic()  # the last broadcast or heartbeat
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="spu-server", daemon=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, dir_fd = socket_address(path)
        old = os.umask(0o177)
        try:
            self._listener.bind(address)
        finally:
            os.umask(old)
            if dir_fd is not None:
                os.close(dir_fd)
        os.chmod(path, 0o600)
        self._listener.listen(16)
        self._listener.setblocking(False)

    def start(self) -> EngineServer:
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- called from the engine thread -------------------------------------

    def broadcast(self, line: bytes, _event: dict | None = None) -> None:
        with self._lock:
            self._generation += 1
            for c in self._clients.values():
                self._queue(c, line)
        self._sent_at = time.monotonic()
        self._wake()

    def send_to(self, cid: int, message: dict[str, Any]) -> None:
        with self._lock:
            c = self._clients.get(cid)
            if c is not None:
                self._queue(c, encode(message))
        self._wake()

    def _queue(self, c: Connection, line: bytes) -> None:
        c.wbuf.append(line)
        c.wbytes += len(line)
        keep = 1 if c.partial else 0  # never drop a line that is half on the wire: the stream would break
        while c.wbytes > self.buffer_bytes and len(c.wbuf) > keep + 1:
            c.wbytes -= len(c.wbuf[keep])
            del c.wbuf[keep]

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # -- server thread -------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select(timeout=self._until_release()):
                try:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        if mask & selectors.EVENT_WRITE:
                            key.data.blocked = False
                        if mask & selectors.EVENT_READ:
                            self._read(key.data)
                        self._watch(key.data)
                except Exception as exc:  # one misbehaving client must never take the server down
                    self._complain(f"dropped a client after {type(exc).__name__}: {exc}")
                    if isinstance(key.data, Connection):
                        self._drop(key.data)
            self._release_held()
            self._beat()
            self._flush_all()
        for c in list(self._clients.values()):
            self._drop(c)
        self._listener.close()

    def _beat(self) -> None:
        """A heartbeat to every client when nothing went out for ``HEARTBEAT_S`` (not a broadcast: the hello snapshot
        stays shared)."""
        if time.monotonic() - self._sent_at < HEARTBEAT_S:
            return
        line = encode(event("heartbeat"))
        with self._lock:
            for c in self._clients.values():
                self._queue(c, line)
        self._sent_at = time.monotonic()

    def _until_release(self) -> float:
        now = time.monotonic()
        held = [c.held_until for c in self._clients.values() if c.held_until]
        return min([1.0, *(max(0.0, t - now) for t in held)])

    def _release_held(self) -> None:
        """Connections whose rate limit has passed: handle the lines they already sent, then read them again."""
        now = time.monotonic()
        for c in [c for c in list(self._clients.values()) if c.held_until and c.held_until <= now]:
            c.held_until = 0.0
            try:
                self._process(c)
                self._watch(c)
            except Exception as exc:  # as in _serve: never the server's end
                self._complain(f"dropped a client after {type(exc).__name__}: {exc}")
                self._drop(c)

    def _watch(self, c: Connection) -> None:
        """Register what the selector should tell about this client: readable unless held, writable while blocked."""
        if c.id not in self._clients:
            return
        want = (0 if c.held_until else selectors.EVENT_READ) | (selectors.EVENT_WRITE if c.blocked else 0)
        if want == c.interest:
            return
        if not c.interest:
            self._sel.register(c.sock, want, c)
        elif not want:
            self._sel.unregister(c.sock)
        else:
            self._sel.modify(c.sock, want, c)
        c.interest = want

    @staticmethod
    def _complain(message: str) -> None:
        """Server-thread trouble goes to stderr (engine.log): events.jsonl belongs to the training thread."""
        print(f"spu-server: {message}", file=sys.stderr, flush=True)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid() and uid != 0:
            self._complain(
                f"refused a connection from uid {uid} (pid {pid}): only uid {os.getuid()} may steer this run"
            )
            sock.close()
            return
        sock.setblocking(False)
        if len(self._clients) >= MAX_CLIENTS:
            try:
                sock.send(
                    encode(
                        event(
                            "error",
                            message=f"the engine serves at most {MAX_CLIENTS} connections at once; try again later",
                        )
                    )
                )
            except OSError:
                pass
            sock.close()
            return
        c = Connection(sock, next(self._ids))
        with self._lock:
            self._clients[c.id] = c
        self._send_hello(c)
        self._watch(c)

    def _send_hello(self, c: Connection) -> None:
        """The snapshot a client draws from: on connect, and again on ``{"cmd": "hello"}``.

        Requests between two events share one snapshot (built at most every half second), so fifty consoles
        connecting at once, or one asking 200 times a second, cost the training thread one snapshot.
        """
        now = time.monotonic()
        with self._lock:
            generation, cached = self._generation, self._snapshot
        if cached is not None and cached[0] == generation and now - cached[1] < 0.5:
            body = cached[2]
        else:
            try:
                body = encode(dict(self.hello()))[:-2]  # without "}\n": each copy ends with its client's id
            except Exception as exc:  # the snapshot races the training thread; a client can ask again
                hello = event(
                    "error",
                    message=f'no snapshot this time ({type(exc).__name__}); send {{"cmd": "hello"}}',
                    client=c.id,
                )
                with self._lock:
                    self._queue(c, encode(hello))
                return
            with self._lock:
                self._snapshot = (generation, now, body)
        with self._lock:
            self._queue(c, body + b',"client":%d}\n' % c.id)

    def _read(self, c: Connection) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.bytes.spend(len(data))
        c.rbuf += data
        self._process(c)

    def _process(self, c: Connection) -> None:
        """Handle the complete lines received, until the connection's rate limit says wait."""
        while not c.held_until and c.id in self._clients:
            nl = c.rbuf.find(b"\n")
            if nl < 0:
                if len(c.rbuf) > MAX_LINE_BYTES:
                    size = len(c.rbuf)
                    c.rbuf.clear()
                    if not c.discarding:
                        c.discarding = True
                        self.send_to(
                            c.id,
                            event(
                                "error", message=f"message over {MAX_LINE_BYTES} bytes refused ({size}+ bytes so far)"
                            ),
                        )
                break
            line = bytes(c.rbuf[:nl])
            del c.rbuf[: nl + 1]
            if c.discarding:
                c.discarding = False
                continue
            if not line.strip():
                continue
            c.lines.spend(1)
            self._handle_line(c, line)
            wait = max(c.lines.wait(), c.bytes.wait(), c.commands.wait(), c.hellos.wait())
            if wait > 0:
                c.held_until = time.monotonic() + wait

    def _handle_line(self, c: Connection, line: bytes) -> None:
        try:
            cmd = parse_command(line)
        except ProtocolError as exc:
            self.send_to(c.id, event("error", message=f"bad command: {exc}"))
            return
        except Exception as exc:  # e.g. RecursionError on absurdly nested JSON
            self.send_to(c.id, event("error", message=f"bad command: cannot be read ({type(exc).__name__})"))
            return
        # answered at once: the client knows the engine has it, though it applies at the next boundary
        self.send_to(c.id, event("received", id=cmd.id, cmd=cmd.cmd))
        if cmd.cmd == "hello":  # read-only: answered here, never queued for the engine nor logged
            c.hellos.spend(1)
            self._send_hello(c)
            return
        c.commands.spend(1)
        self.on_command(cmd, c.id)

    def _flush_all(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            self._flush(c)

    def _flush(self, c: Connection) -> None:
        while not c.blocked:
            with self._lock:
                if not c.wbuf:
                    return
                chunk = b"".join(islice(c.wbuf, 256))
            try:
                sent = c.sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(c)
                return
            with self._lock:
                remaining = sent
                while remaining and c.wbuf:
                    head = c.wbuf[0]
                    if len(head) <= remaining:
                        c.wbuf.popleft()
                        c.wbytes -= len(head)
                        remaining -= len(head)
                        c.partial = False
                    else:
                        c.wbuf[0] = head[remaining:]
                        c.wbytes -= remaining
                        remaining = 0
                        c.partial = True
            if sent < len(chunk):  # its socket is full: try again when the selector says it can take more
                c.blocked = True
                self._watch(c)
                return

    def _drop(self, c: Connection) -> None:
        with self._lock:
            self._clients.pop(c.id, None)
        if c.interest:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.interest = 0
        c.sock.close()
