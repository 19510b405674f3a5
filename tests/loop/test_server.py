"""The socket server alone: validation, size caps, slow clients, long paths, peer credentials."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from spu_engine.core.protocol import encode, event
from spu_engine.core.transport import EngineClient, EngineServer


@pytest.fixture
def server(tmp_path):
    received: list = []
    srv = EngineServer(
        tmp_path / "control.sock", lambda cmd, cid: received.append(cmd), lambda: event("hello", step=0)
    ).start()
    yield srv, received
    srv.close()


def _errors(client: EngineClient) -> list[dict]:
    out = []
    while not client.events.empty():
        ev = client.events.get()
        if ev["type"] == "error":
            out.append(ev)
    return out


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_each_bad_line_gets_one_error_and_the_server_keeps_serving(server):
    srv, received = server
    client = EngineClient(srv.path).connect(5)
    client.wait_for(lambda e: e["type"] == "hello", 5)
    bad = [
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to overflow the JSON parser's recursion
        b"\xff\xfe\x00",
        b'{"cmd": "stop", "checkpoint": [1]}',
        b'{"cmd": "change", "change": {"set": {"nonsense": 1}}}',
        b'{"cmd": "pause", "id": {"a": 1}}',
        b"x" * (3 << 20),  # over the 1 MB cap: refused unread
    ]
    client.send_raw(b"\n".join(bad) + b"\n")
    cid = client.send("pause")
    _until(lambda: len(received) == 1)
    assert received[0].cmd == "pause" and received[0].id == cid
    time.sleep(0.2)
    messages = [e["message"] for e in _errors(client)]
    assert len(messages) == len(bad)
    assert messages[0] == "bad command: cannot be read (RecursionError)"
    assert messages[1] == "bad command: message is not UTF-8"
    assert messages[2].startswith("bad command: stop: checkpoint:")
    assert "unknown section 'nonsense'" in messages[3]
    assert messages[5].startswith("message over 1048576 bytes refused")


def test_hello_command_sends_a_fresh_snapshot(server):
    srv, _ = server
    client = EngineClient(srv.path).connect(5)
    first = client.wait_for(lambda e: e["type"] == "hello", 5)
    client.send("hello")
    again = client.wait_for(lambda e: e["type"] == "hello", 5)
    assert again["client"] == first["client"] and again["t"] >= first["t"]


def test_a_slow_client_loses_whole_old_lines_never_half_a_line(tmp_path):
    srv = EngineServer(
        tmp_path / "control.sock", lambda cmd, cid: None, lambda: event("hello"), buffer_bytes=64 << 10
    ).start()
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(str(srv.path))
        _until(lambda: srv.client_count == 1)
        for i in range(300):  # 45 MB of long lines while the client reads nothing: sends go out part by part
            srv.broadcast(encode(event("step", step=i, pad="x" * 150_000)))
            if i % 50 == 0:
                time.sleep(0.05)
        time.sleep(0.3)
        slow.settimeout(1.0)
        data = b""
        try:
            while chunk := slow.recv(1 << 16):
                data += chunk
        except TimeoutError:
            pass
        slow.close()
    finally:
        srv.close()
    lines = data.split(b"\n")[:-1]
    steps = [json.loads(line)["step"] for line in lines[1:]]  # every line is whole JSON
    assert steps == sorted(steps) and steps[-1] == 299 and len(steps) < 300  # old lines dropped, newest kept


def test_socket_path_longer_than_af_unix_allows(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    srv = EngineServer(deep / "control.sock", lambda cmd, cid: None, lambda: event("hello", step=3)).start()
    try:
        assert len(os.fsencode(srv.path)) > 108 and os.stat(srv.path).st_mode & 0o777 == 0o600
        client = EngineClient(srv.path).connect(5)
        assert client.wait_for(lambda e: e["type"] == "hello", 5)["step"] == 3
        client.close()
    finally:
        srv.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_a_peer_of_another_user_is_refused_by_its_credentials():
    folder = Path(tempfile.mkdtemp(prefix="spu-peer-"))  # pytest's tmp_path is not reachable for another user
    folder.chmod(0o777)  # open the file modes on purpose: the credential check alone must refuse
    srv = EngineServer(folder / "control.sock", lambda cmd, cid: None, lambda: event("hello")).start()
    try:
        srv.path.chmod(0o777)
        pid = os.fork()
        if pid == 0:  # child: become nobody, connect, report what the server said (exit 0: nothing, then closed)
            code = 3
            try:
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(srv.path))
                s.settimeout(5)
                code = 0 if s.recv(65536) == b"" else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # connected, then closed without a word
        own = EngineClient(srv.path).connect(5)
        assert own.wait_for(lambda e: e["type"] == "hello", 5)
    finally:
        srv.close()
        shutil.rmtree(folder)


def test_hello_is_answered_by_the_server_and_never_reaches_the_engine(server):
    srv, received = server
    client = EngineClient(srv.path).connect(5)
    client.wait_for(lambda e: e["type"] == "hello", 5)
    for _ in range(8):
        client.send("hello")
    hellos = [client.wait_for(lambda e: e["type"] == "hello", 5) for _ in range(8)]
    assert all(h["client"] == hellos[0]["client"] for h in hellos)
    cid = client.send("pause")
    _until(lambda: len(received) == 1)
    assert [c.cmd for c in received] == ["pause"] and received[
        0
    ].id == cid  # no hello in the engine's inbox (nor its log)


def test_a_flooding_connection_is_held_to_its_rate_and_others_are_not(server):
    from spu_engine.core.transport import connection as srv_module

    srv, received = server
    flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flooder.connect(str(srv.path))
    start = time.monotonic()
    flooder.sendall(b'{"cmd": "pause"}\n' * 300)  # all at once: the kernel buffers them, the server reads at its pace
    time.sleep(0.5)
    assert 0 < len(received) < 300  # not all of them passed on at once
    _until(lambda: len(received) >= srv_module.COMMAND_BURST + 5)  # past the burst it keeps being served ...
    elapsed = time.monotonic() - start
    # ... but never faster than the bucket allows: burst + rate x time (an invariant of the limiter, not a timing)
    assert len(received) <= srv_module.COMMAND_BURST + srv_module.COMMAND_RATE * elapsed + 1
    other = EngineClient(srv.path).connect(5)
    other.wait_for(lambda e: e["type"] == "hello", 5)
    cid = other.send("resume")
    _until(lambda: any(c.id == cid for c in received), 5)  # another connection has its own budget
    flooder.close()


def test_connections_beyond_the_cap_are_told_and_closed(tmp_path, monkeypatch):
    from spu_engine.core.transport import server as srv_module

    monkeypatch.setattr(srv_module, "MAX_CLIENTS", 3)
    srv = EngineServer(tmp_path / "control.sock", lambda cmd, cid: None, lambda: event("hello", step=0)).start()
    try:
        clients = [EngineClient(srv.path).connect(5) for _ in range(3)]
        for c in clients:
            c.wait_for(lambda e: e["type"] == "hello", 5)
        extra = EngineClient(srv.path).connect(5)
        refused = extra.wait_for(lambda e: e["type"] == "error", 5)
        assert "at most 3 connections" in refused["message"]
        _until(lambda: not extra.connected)
        assert srv.client_count == 3
    finally:
        srv.close()


def test_a_quiet_engine_sends_heartbeats_to_every_client(server):
    """Nothing to say for a while (paused, loading, a long step): a heartbeat, so a console hearing nothing at all
    knows the engine is silent (stopped, hung), not quiet."""
    srv, received = server
    clients = [EngineClient(srv.path).connect(5) for _ in range(2)]
    for client in clients:
        client.wait_for(lambda e: e["type"] == "hello", 5)
        beat = client.wait_for(lambda e: e["type"] != "received", 15)
        assert beat["type"] == "heartbeat" and set(beat) == {"type", "t"}
    assert received == []  # nothing reached the engine (nor its events.jsonl)
