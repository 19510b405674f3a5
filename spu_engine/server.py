"""The engine as its own process, serving a Unix socket in the run folder.

The training loop owns the main thread; one server thread multiplexes every
client with ``selectors``.  Each client has a bounded outgoing buffer: when a
slow client falls behind, its oldest lines are dropped (it can rebuild history
from ``events.jsonl``) so the engine never waits for anyone.  Incoming lines
are size-capped and validated; a bad one gets an ``error`` event and nothing
else happens.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import queue
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .protocol import MAX_LINE_BYTES, ProtocolError, encode, event, parse_command

SOCKET_NAME = "control.sock"
LOCK_NAME = "engine.lock"
CLIENT_BUFFER_BYTES = 4 << 20


class RunInUseError(RuntimeError):
    """The run folder belongs to a live engine."""


class RunLock:
    """An flock on ``engine.lock`` held for the engine's lifetime; records the pid."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUseError(
                f"run folder {self.path.parent} is in use by a live engine (pid {pid}); "
                f"attach to it with `spu-tui attach {self.path.parent}` or choose another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def prepare_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)


class _Client:
    def __init__(self, sock: socket.socket, cid: int) -> None:
        self.sock = sock
        self.id = cid
        self.rbuf = bytearray()
        self.wbuf: deque[bytes] = deque()
        self.wbytes = 0
        self.dropped = 0
        self.discarding = False  # inside an over-long line: skip to its newline


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
        self._clients: dict[int, _Client] = {}
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
        old = os.umask(0o177)
        try:
            self._listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._listener.listen(16)
        self._listener.setblocking(False)

    def start(self) -> "EngineServer":
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
            for c in self._clients.values():
                self._queue(c, line)
        self._wake()

    def send_to(self, cid: int, message: dict[str, Any]) -> None:
        with self._lock:
            c = self._clients.get(cid)
            if c is not None:
                self._queue(c, encode(message))
        self._wake()

    def _queue(self, c: _Client, line: bytes) -> None:
        c.wbuf.append(line)
        c.wbytes += len(line)
        while c.wbytes > self.buffer_bytes and len(c.wbuf) > 1:
            c.wbytes -= len(c.wbuf.popleft())
            c.dropped += 1

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # -- server thread -------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    c: _Client = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(c)
            self._flush_all()
        for c in list(self._clients.values()):
            self._drop(c)
        self._listener.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid() and uid != 0:
            sock.close()
            return
        sock.setblocking(False)
        c = _Client(sock, next(self._ids))
        with self._lock:
            self._clients[c.id] = c
            hello = dict(self.hello())
            hello["client"] = c.id
            self._queue(c, encode(hello))
        self._sel.register(sock, selectors.EVENT_READ, c)

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.rbuf += data
        while True:
            nl = c.rbuf.find(b"\n")
            if nl < 0:
                if len(c.rbuf) > MAX_LINE_BYTES:
                    size = len(c.rbuf)
                    c.rbuf.clear()
                    if not c.discarding:
                        c.discarding = True
                        self.send_to(c.id, event("error", message=f"message over {MAX_LINE_BYTES} bytes refused ({size}+ bytes so far)"))
                return
            line = bytes(c.rbuf[:nl])
            del c.rbuf[: nl + 1]
            if c.discarding:
                c.discarding = False
                continue
            if not line.strip():
                continue
            try:
                cmd = parse_command(line)
            except ProtocolError as exc:
                self.send_to(c.id, event("error", message=f"bad command: {exc}"))
                continue
            self.on_command(cmd, c.id)

    def _flush_all(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            self._flush(c)

    def _flush(self, c: _Client) -> None:
        while True:
            with self._lock:
                if not c.wbuf:
                    return
                chunk = b"".join(list(c.wbuf)[:256])
            try:
                sent = c.sock.send(chunk)
            except BlockingIOError:
                return
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
                    else:
                        c.wbuf[0] = head[remaining:]
                        c.wbytes -= remaining
                        remaining = 0
            if sent < len(chunk):
                return

    def _drop(self, c: _Client) -> None:
        with self._lock:
            self._clients.pop(c.id, None)
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()


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

    def connect(self, timeout: float = 30.0) -> "EngineClient":
        """Connect, retrying until the socket exists and answers (an engine may still be starting)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
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
        assert self._sock is not None
        buf = b""
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line:
                        self._deliver(json.loads(line))
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


def serve(config, policy, run_dir: Path, resume: bool = False, sinks: list | None = None) -> int:
    """Run an engine process: lock the run folder, serve the socket, train.  Returns an exit code."""
    from .checkpoint import latest_checkpoint
    from .data import DataError
    from .engine import Engine, install_sigterm
    from .model import ModelLoadError
    from .policy import PolicyError

    prepare_run_dir(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    events_path = run_dir / "events.jsonl"
    early = open(events_path, "ab", buffering=0)
    loading = event("hello", run=run_dir.name, run_dir=str(run_dir), pid=os.getpid(), state="loading", step=0, config=config.model_dump())
    engine_box: dict[str, Any] = {}
    early_commands: list[Any] = []  # commands sent while the model loads run at the first boundary
    handover = threading.Lock()

    def on_command(cmd, cid):
        with handover:
            engine = engine_box.get("engine")
            if engine is None:
                early_commands.append(cmd)
            else:
                engine.submit(cmd)

    server = EngineServer(run_dir / SOCKET_NAME, on_command, lambda: engine_box["engine"].hello() if "engine" in engine_box else loading).start()

    def early_emit(type_: str, **fields: Any) -> None:
        line = encode(event(type_, **fields))
        early.write(line)
        server.broadcast(line)

    early_emit("state", state="loading", step=0, message=f"loading {config.model}")
    try:
        engine = Engine(config, policy, run_dir, sinks=[server.broadcast, *(sinks or [])])
        early.close()
        if resume:
            path = latest_checkpoint(run_dir / "checkpoints", log=lambda m: engine.log(m, "warning"))
            if path is not None:
                engine.resume_from(path)
            else:
                engine.log("no usable checkpoint; starting from step 0", "warning")
    except (PolicyError, ModelLoadError, DataError, ValueError) as exc:
        early_emit("error", step=0, message=str(exc))
        early_emit("state", state="error", step=0, message=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        time.sleep(0.3)
        server.close()
        lock.release()
        return 2
    with handover:
        for cmd in early_commands:
            engine.submit(cmd)
        engine_box["engine"] = engine
    install_sigterm(engine)
    try:
        engine.run()
    finally:
        time.sleep(0.2)  # let the last events reach clients
        server.close()
        engine.close()
        lock.release()
    return 0


def spawn_engine(config, policy, run_dir: Path, resume: bool = False):
    """Start ``spu engine`` as its own process in its own session (survives SSH hangups and UI crashes)."""
    import subprocess

    from .policy import atomic_write_text

    prepare_run_dir(run_dir)
    atomic_write_text(run_dir / "config.json", json.dumps(config.model_dump(), indent=1))
    policy.save(run_dir / "policy.yaml")
    log = open(run_dir / "engine.log", "ab")
    cmd = [sys.executable, "-m", "spu_engine.cli", "engine", "--run-dir", str(run_dir)]
    if resume:
        cmd.append("--resume")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    log.close()
    return proc
