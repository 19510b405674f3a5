"""The engine as its own process, serving a Unix socket in the run folder.

The training loop owns the main thread; one server thread multiplexes every
client with ``selectors``.  Each client has a bounded outgoing buffer: when a
slow client falls behind, its oldest lines are dropped (it can rebuild history
from ``events.jsonl``) so the engine never waits for anyone.  Incoming lines
are size-capped and validated; a bad one gets an ``error`` event and nothing
else happens.  Each connection has rate limits (lines, bytes, commands for the
engine, hello): past one the server stops reading that socket for a while, so
a flooding client waits on its own writes instead of slowing training.
``hello`` is answered here from a snapshot shared by every request between two
events; it never reaches the engine or events.jsonl.

Security: the run folder is 0700 and every file the engine writes is private
(umask 077); the socket is 0600 and a peer of another user is refused by its
kernel-reported credentials (SO_PEERCRED), whatever the file modes say.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import queue
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from .policy import PolicyError
from .protocol import MAX_LINE_BYTES, PreviewCmd, ProtocolError, encode, event, parse_command

SOCKET_NAME = "control.sock"
LOCK_NAME = "engine.lock"
CLIENT_BUFFER_BYTES = 4 << 20
MAX_SOCKET_PATH = 100  # AF_UNIX addresses hold 107 bytes on Linux
MAX_CLIENTS = 128  # connections at once; each may hold CLIENT_BUFFER_BYTES of unsent events
# per connection, sustained rate and burst: any line (parsed and answered here), bytes, commands the engine applies,
# and hello (a full snapshot; a console needs one when it connects, which the server sends unasked)
LINE_RATE, LINE_BURST = 50.0, 1000.0
BYTE_RATE, BYTE_BURST = float(4 << 20), float(16 << 20)
COMMAND_RATE, COMMAND_BURST = 10.0, 50.0
HELLO_RATE, HELLO_BURST = 2.0, 10.0


class RunFolderError(RuntimeError):
    """The run folder cannot be used; the text says why and what to do."""


class RunInUseError(RunFolderError):
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


RUN_FILES = ("events.jsonl", "policy.yaml", "config.json", "engine.log")  # with checkpoints/: what makes a folder a run


def holds_run(run_dir: Path) -> bool:
    """True if the folder has the files of a run (an events log, a config, or checkpoints)."""
    return any((run_dir / name).is_file() for name in ("events.jsonl", "config.json")) or (run_dir / "checkpoints").is_dir()


def clear_run(run_dir: Path) -> None:
    """Delete a run's own files (--overwrite, with the lock held); anything else in the folder stays."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder (0700) and make what is already in it private."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = run_dir.stat().st_uid
    if owner != os.getuid():
        raise RunFolderError(f"run folder {run_dir} belongs to another user (uid {owner}); choose another --run-dir")
    os.chmod(run_dir, 0o700)
    for name in ("events.jsonl", "engine.log", "config.json", "policy.yaml"):
        if (run_dir / name).is_file():
            os.chmod(run_dir / name, 0o600)


def _address(path: Path) -> tuple[str, int | None]:
    """An AF_UNIX address for ``path``; a path too long for one is reached through its folder's fd (Linux)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


class _Bucket:
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


class _Client:
    def __init__(self, sock: socket.socket, cid: int) -> None:
        self.sock = sock
        self.id = cid
        self.rbuf = bytearray()
        self.wbuf: deque[bytes] = deque()
        self.wbytes = 0
        self.partial = False  # wbuf[0] is the rest of a line already half sent: it must go out whole
        self.dropped = 0
        self.discarding = False  # inside an over-long line: skip to its newline
        self.lines = _Bucket(LINE_RATE, LINE_BURST)
        self.bytes = _Bucket(BYTE_RATE, BYTE_BURST)
        self.commands = _Bucket(COMMAND_RATE, COMMAND_BURST)
        self.hellos = _Bucket(HELLO_RATE, HELLO_BURST)
        self.held_until = 0.0  # over its rate: not read until then (monotonic time)
        self.blocked = False  # its socket buffer is full: flushed again when the selector says writable
        self.interest = 0  # selector events registered for it


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
        self._snapshot: tuple[int, float, bytes] | None = None  # (events generation, time, hello without its closing brace)
        self._generation = 0  # bumped by every broadcast: a snapshot is shared only between two events
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
        address, dir_fd = _address(path)
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
            self._generation += 1
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
        keep = 1 if c.partial else 0  # never drop a line that is half on the wire: the stream would break
        while c.wbytes > self.buffer_bytes and len(c.wbuf) > keep + 1:
            c.wbytes -= len(c.wbuf[keep])
            del c.wbuf[keep]
            c.dropped += 1

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
                    if isinstance(key.data, _Client):
                        self._drop(key.data)
            self._release_held()
            self._flush_all()
        for c in list(self._clients.values()):
            self._drop(c)
        self._listener.close()

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

    def _watch(self, c: _Client) -> None:
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
            self._complain(f"refused a connection from uid {uid} (pid {pid}): only uid {os.getuid()} may steer this run")
            sock.close()
            return
        sock.setblocking(False)
        if len(self._clients) >= MAX_CLIENTS:
            try:
                sock.send(encode(event("error", message=f"the engine serves at most {MAX_CLIENTS} connections at once; try again later")))
            except OSError:
                pass
            sock.close()
            return
        c = _Client(sock, next(self._ids))
        with self._lock:
            self._clients[c.id] = c
        self._send_hello(c)
        self._watch(c)

    def _send_hello(self, c: _Client) -> None:
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
                hello = event("error", message=f"no snapshot this time ({type(exc).__name__}); send {{\"cmd\": \"hello\"}}", client=c.id)
                with self._lock:
                    self._queue(c, encode(hello))
                return
            with self._lock:
                self._snapshot = (generation, now, body)
        with self._lock:
            self._queue(c, body + b',"client":%d}\n' % c.id)

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
        c.bytes.spend(len(data))
        c.rbuf += data
        self._process(c)

    def _process(self, c: _Client) -> None:
        """Handle the complete lines received, until the connection's rate limit says wait."""
        while not c.held_until and c.id in self._clients:
            nl = c.rbuf.find(b"\n")
            if nl < 0:
                if len(c.rbuf) > MAX_LINE_BYTES:
                    size = len(c.rbuf)
                    c.rbuf.clear()
                    if not c.discarding:
                        c.discarding = True
                        self.send_to(c.id, event("error", message=f"message over {MAX_LINE_BYTES} bytes refused ({size}+ bytes so far)"))
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

    def _handle_line(self, c: _Client, line: bytes) -> None:
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

    def _flush(self, c: _Client) -> None:
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

    def _drop(self, c: _Client) -> None:
        with self._lock:
            self._clients.pop(c.id, None)
        if c.interest:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.interest = 0
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
                address, dir_fd = _address(self.path)
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


class StoppedWhileLoading(BaseException):
    """A stop signal arrived before the engine existed: nothing was trained, nothing to save."""


class StopSignals:
    """SIGTERM and Ctrl-C stop the run after a checkpoint at the next step boundary, never mid-step.

    A second Ctrl-C stops at once.  SIGHUP is ignored, so closing the terminal
    or losing the SSH session of a foreground ``spu train`` does not stop it.
    Before the engine exists a signal ends loading at once.  The handler only
    sets a flag on the engine: it may run while the training thread holds any lock.
    """

    def __init__(self) -> None:
        self.engine = None
        self.interrupts = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum, handler in ((signal.SIGTERM, self._on_signal), (signal.SIGINT, self._on_signal), (signal.SIGHUP, signal.SIG_IGN)):
                self._previous[signum] = signal.signal(signum, handler)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.engine is None:
            raise StoppedWhileLoading(name)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
        self.engine.request_stop(name)


def _guarded(sink: Callable[[bytes, dict], None]) -> Callable[[bytes, dict], None]:
    """A display that fails (its terminal went away) is switched off; training never stops for one."""
    alive = True

    def call(line: bytes, ev: dict) -> None:
        nonlocal alive
        if alive:
            try:
                sink(line, ev)
            except Exception:
                alive = False

    return call


def _open_events(path: Path):
    """Append handle on events.jsonl; a line cut short by a crash is ended first so the next event is readable."""
    f = open(path, "ab+", buffering=0)
    if f.seek(0, os.SEEK_END) > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    return f


def _resume(engine, run_dir: Path, fresh_optimizer: bool, policy_note: str | None) -> None:
    """Continue from the newest usable checkpoint; nothing unusable is deleted, and none usable is an error."""
    from .checkpoint import checkpoint_to_resume, remove_partial

    folder = run_dir / "checkpoints"

    def warn(message: str) -> None:
        engine.log(message, "warning")

    remove_partial(folder, warn)
    path = checkpoint_to_resume(folder, fresh_optimizer, warn)  # CheckpointError: exit 2, every file kept
    engine.resume_from(path, fresh_optimizer=fresh_optimizer)
    engine.log(f"policy: the one stored in {path.name} (state at step 0 and its timeline)" + (f"; {policy_note}" if policy_note else ""))
    if engine.step >= engine.config.steps:
        warn(f"the run already reached its {engine.config.steps} steps; pass --steps to train further")


def _serve_worker(config, policy, run_dir: Path, resume: bool, dist, fresh_optimizer: bool = False) -> int:
    """A rank other than 0: no socket, no run-folder writes; commands arrive from rank 0 at each boundary."""
    from .checkpoint import list_checkpoints
    from .engine import Engine

    signals = StopSignals()
    signals.install()
    engine = Engine(config, policy, None, dist=dist)
    step = dist.broadcast(None)
    if step is not None:
        path = next(p for p in list_checkpoints(run_dir / "checkpoints") if p.name == f"step-{step:07d}")
        engine.resume_from(path, fresh_optimizer=fresh_optimizer)
    signals.engine = engine
    try:
        engine.run()
        return 1 if engine.fault_stop else 0
    finally:
        signals.restore()
        engine.close()
        dist.close()


def preview(engine, cmd) -> dict[str, Any]:
    """The ``preview`` event answering ``cmd``: what its change would do, or why it would be refused."""
    if engine is None:
        return event("preview", id=cmd.id, error="the model is still loading")
    try:
        return event("preview", id=cmd.id, step=engine.step, **engine.preview(cmd.change))
    except PolicyError as exc:
        return event("preview", id=cmd.id, step=engine.step, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the training thread changed the model under us: the console asks again
        return event("preview", id=cmd.id, step=engine.step, error=f"no preview this time ({type(exc).__name__})")


def serve(
    config, policy, run_dir: Path, resume: bool = False, sinks: list | None = None, *, fresh_optimizer: bool = False, overwrite: bool = False,
) -> int:
    """Run an engine process: lock the run folder, serve the socket, train.

    Returns the exit code: 0 finished or stopped (SIGTERM included), 1 failed
    or stopped by a fault (non-finite loss, a checkpoint SIGTERM could not write), 2 could not start,
    130 a second Ctrl-C.  A folder this call created is removed again when a user error stops the start
    (nothing was trained).  On resume ``policy`` None means policy.yaml was unreadable: the checkpoint's
    policy is used (it always is) and the unreadable file is kept as ``policy.yaml.unreadable``.
    ``overwrite`` deletes the folder's run files once the lock is held.
    """
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import Distributed
    from .engine import Engine
    from .model_source import ModelLoadError

    dist = Distributed.from_env()
    if dist is not None and not dist.is_main:
        return _serve_worker(config, policy, run_dir, resume, dist, fresh_optimizer)
    os.umask(0o077)  # every file and folder this process creates is its owner's alone
    created = not run_dir.exists()
    prepare_run_dir(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    if overwrite and not resume:
        clear_run(run_dir)
    policy_note = None
    if resume and policy is None and (run_dir / "policy.yaml").exists():
        os.replace(run_dir / "policy.yaml", run_dir / "policy.yaml.unreadable")
        policy_note = "policy.yaml was unreadable and is kept as policy.yaml.unreadable"
    signals = StopSignals()
    early = _open_events(run_dir / "events.jsonl")
    loading = event("hello", run=run_dir.name, run_dir=str(run_dir), pid=os.getpid(), state="loading", step=0, config=config.model_dump())
    engine_box: dict[str, Any] = {}
    early_commands: list[Any] = []  # commands sent while the model loads run at the first boundary
    handover = threading.Lock()

    def on_command(cmd, cid):
        if isinstance(cmd, PreviewCmd):  # read-only: answered now, from the socket thread
            server.send_to(cid, preview(engine_box.get("engine"), cmd))
            return
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

    user_error = False

    def give_up(code: int, message: str) -> int:
        nonlocal user_error
        user_error = code == 2 and created and not resume
        early_emit("error", step=0, message=message)
        early_emit("state", state="error", step=0, message=message)
        print(f"error: {message}", file=sys.stderr)
        return code

    try:
        try:
            signals.install()
            early_emit("state", state="loading", step=0, message=f"loading {config.model}")
            engine = Engine(config, policy, run_dir, sinks=[server.broadcast, *map(_guarded, sinks or [])], dist=dist)
            if resume:
                _resume(engine, run_dir, fresh_optimizer, policy_note)
            if dist is not None:  # workers resume from the checkpoint rank 0 chose
                dist.broadcast(engine.step if resume and engine.step > 0 else None)
            signals.engine = engine
        except StoppedWhileLoading as stop:
            since = " since the newest checkpoint" if resume else ""
            early_emit("state", state="stopped", step=0, message=f"{stop}: stopped while loading; nothing was trained{since}")
            return 0
        except (PolicyError, ModelLoadError, DataError, CheckpointError, ValueError) as exc:
            return give_up(2, str(exc))
        except Exception as exc:
            traceback.print_exc()
            return give_up(1, f"engine failed while loading: {type(exc).__name__}: {exc}")
        finally:
            early.close()
        with handover:
            for cmd in early_commands:
                engine.submit(cmd)
            engine_box["engine"] = engine
        try:
            engine.run()
            code = 1 if engine.fault_stop else 0
        except KeyboardInterrupt:
            engine.set_state("stopped", f"interrupted at step {engine.step}; no checkpoint written")
            code = 130
        except Exception as exc:
            traceback.print_exc()
            message = f"engine failed at step {engine.step}: {type(exc).__name__}: {exc}"
            engine.emit("error", step=engine.step, message=message)
            engine.set_state("error", message)
            code = 1
        finally:
            engine.close()
            if dist is not None:
                dist.close()
        return code
    finally:
        signals.restore()
        time.sleep(0.2)  # let the last events reach clients
        server.close()
        lock.release()
        if user_error:  # nothing was trained in the folder this call made: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"nothing was trained; removed {run_dir}", file=sys.stderr)


def spawn_engine(config, policy, run_dir: Path, resume: bool = False):
    """Start ``spu engine`` as its own process in its own session (survives SSH hangups and UI crashes)."""
    import subprocess

    from .policy import atomic_write_text
    from .runs import is_live

    if is_live(run_dir):
        raise RunInUseError(f"run folder {run_dir} is in use by a live engine; attach to it with `spu-tui attach {run_dir}`")
    prepare_run_dir(run_dir)
    atomic_write_text(run_dir / "config.json", json.dumps(config.model_dump(), indent=1))
    if policy is not None:  # None: resuming with an unreadable policy.yaml (the checkpoint's policy is used)
        policy.model_copy(update={"run": config.run_settings()}).save(run_dir / "policy.yaml")  # this run's settings, not the file's
    log_fd = os.open(run_dir / "engine.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    cmd = [sys.executable, "-m", "spu_engine.cli", "engine", "--run-dir", str(run_dir)]
    if resume:
        cmd.append("--resume")
    try:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, umask=0o077
        )
    finally:
        os.close(log_fd)
