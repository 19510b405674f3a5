"""Step time of a training engine while its socket is under load, against no client at all.

    python bench/socket_load.py [--rounds 6] [--window 8]

1. Starts an engine process (offline MiniLM, batch 32, length 64, embeddings and
   blocks 0-3 frozen) on SST-2 sentences joined in fours, so every batch is cut
   to the full 64 tokens and step times differ by machine noise, not padding.
2. Runs ``--rounds`` rounds of two windows of ``--window`` steps: quiet (no
   connection at all) and loaded, where at the window's start 50 connections
   open at once and read everything, 20 more connect and never read a byte, and
   one more sends ``hello`` 200 times a second (reading the answers).  The first
   steps after the load starts are not counted; the load ends with the window.
3. Step time is the wall time between consecutive step events, so it includes
   the step boundaries where commands would be applied.

Prints the loaded / quiet ratio of the median step times (budget <= 1.05), a 90 %
interval from resampling rounds and every round's ratio; the engine process's CPU
seconds per step, loaded / quiet (what the load costs the engine itself, which
the noise of a shared machine moves far less than wall time); what the flooding
client achieved (hellos sent and answered per second: the per-connection rate
limit holds it back); and the CPU this script used for the load.  All clients
live in one thread of this process, which competes with training for the cores.
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from timing import StepEvents, joined_sst2

from spu_engine.core.policy import FreezeRule, Policy
from spu_engine.core.runs import SOCKET
from spu_engine.core.spawn import spawn_engine
from spu_engine.loop.engine import EngineConfig

SETTLE = 2  # steps after the load starts that are not counted
HELLO = b'{"cmd": "hello"}\n'


class Steps(StepEvents):
    """Wall time between step events (no socket: the quiet windows have no client at all)."""

    def intervals(self, first: int, n: int) -> list[float]:
        return [self.events[s]["t"] - self.events[s - 1]["t"] for s in range(first, first + n)]


class Load:
    """50 reading connections, 20 that never read, one sending hello at 200/s; all served by one selector loop."""

    def __init__(self, path: Path, readers: int, silent: int, hello_rate: float) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.hello_every = 1.0 / hello_rate
        self.attempts = self.sent = self.answered = 0
        self.refused = 0
        for i in range(readers + silent + 1):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            s.setblocking(False)
            self.socks.append(s)
            if i < readers or i == readers + silent:  # the flooder reads its answers too
                self.sel.register(s, selectors.EVENT_READ)
        self.flooder = self.socks[-1]
        self.pending = b""

    def run_until(self, done) -> None:
        next_hello = time.monotonic()
        while not done():
            now = time.monotonic()
            if now >= next_hello:
                next_hello += self.hello_every
                self.attempts += 1
                if not self.pending:
                    self.pending = HELLO
                    self.sent += 1
                try:
                    self.pending = self.pending[self.flooder.send(self.pending) :]
                except BlockingIOError:
                    pass  # the server stopped reading it (its rate limit): this hello waits, the next ones are not sent
            for key, _ in self.sel.select(timeout=max(0.0, next_hello - time.monotonic())):
                try:
                    data = key.fileobj.recv(1 << 20)
                except BlockingIOError:
                    continue
                if key.fileobj is self.flooder:
                    self.answered += data.count(b'"type":"hello"')
                if b"at most" in data and b"connections" in data:
                    self.refused += 1

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.sel.close()


def wait_for(steps: Steps, step: int) -> None:
    while steps.last() < step:
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of the process (training, socket server, everything)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--window", type=int, default=8, help="steps counted per window")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the first window")
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--silent", type=int, default=20)
    parser.add_argument("--hello-rate", type=float, default=200.0)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="spu-socket-load-"))
    run_dir = tmp / "run"
    config = EngineConfig(
        model="minilm",
        data=str(joined_sst2(tmp / "data")),
        steps=100_000,
        batch_size=32,
        max_length=64,
        eval_every=0,
        stats_every=10,
        max_eval_samples=64,
        threads=os.cpu_count(),
    )
    frozen = Policy(
        freeze=[FreezeRule(units=["embeddings"], trainable=False), FreezeRule(layers=[0, 1, 2, 3], trainable=False)]
    )
    proc = spawn_engine(config, frozen, run_dir)
    steps = Steps(run_dir / "events.jsonl")
    quiet: list[list[float]] = []
    loaded: list[list[float]] = []
    flood: list[tuple[int, int, int, float]] = []  # attempts, sent, answered, seconds
    cpu_per_step: dict[str, list[float]] = {"quiet": [], "loaded": []}
    load_cpu = load_wall = 0.0
    try:
        print(
            f"engine pid {proc.pid}, MiniLM (embeddings + blocks 0-3 frozen), batch 32, length 64, {os.cpu_count()} cores",
            flush=True,
        )
        wait_for(steps, args.warmup)
        for r in range(args.rounds):
            first = steps.last() + 2  # the next whole interval
            wait_for(steps, first - 1)
            engine_cpu = cpu_seconds(proc.pid)
            wait_for(steps, first + args.window - 1)
            cpu_per_step["quiet"].append((cpu_seconds(proc.pid) - engine_cpu) / (steps.last() - first + 1))
            quiet.append(steps.intervals(first, args.window))

            load = Load(run_dir / SOCKET, args.readers, args.silent, args.hello_rate)
            cpu, wall = time.process_time(), time.monotonic()
            start = steps.last()
            first = start + SETTLE + 1
            load.run_until(lambda first=first: steps.last() >= first - 1)
            engine_cpu = cpu_seconds(proc.pid)
            load.run_until(lambda first=first: steps.last() >= first + args.window - 1)
            cpu_per_step["loaded"].append((cpu_seconds(proc.pid) - engine_cpu) / (steps.last() - first + 1))
            seconds = time.monotonic() - wall
            load_cpu += time.process_time() - cpu
            load_wall += seconds
            load.close()
            loaded.append(steps.intervals(first, args.window))
            flood.append((load.attempts, load.sent, load.answered, seconds))
            print(
                f"round {r + 1}: quiet median {statistics.median(quiet[-1]):.3f} s, loaded {statistics.median(loaded[-1]):.3f} s; "
                f"hello tried {load.attempts / seconds:.0f}/s, got onto the socket {load.sent / seconds:.0f}/s, answered "
                f"{load.answered / seconds:.0f}/s; refused connections {load.refused}",
                flush=True,
            )
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(rounds: list[int]) -> float:
        return statistics.median(t for i in rounds for t in loaded[i]) / statistics.median(
            t for i in rounds for t in quiet[i]
        )

    everything = list(range(args.rounds))
    rng = random.Random(0)
    draws = sorted(ratio(rng.choices(everything, k=len(everything))) for _ in range(2000))
    per_round = [statistics.median(loaded[i]) / statistics.median(quiet[i]) for i in everything]
    attempts, sent, answered, seconds = (sum(f[k] for f in flood) for k in range(4))
    print(
        f"step time, median: quiet {statistics.median(t for w in quiet for t in w):.3f} "
        f"s, loaded {statistics.median(t for w in loaded for t in w):.3f} s"
    )
    print(
        f"loaded / quiet: {ratio(everything):.3f}  (90 % interval over rounds {draws[100]:.3f} .. {draws[-100]:.3f}; budget <= 1.05)"
    )
    print("  per round: " + " ".join(f"{x:.3f}" for x in per_round))
    quiet_cpu, loaded_cpu = statistics.mean(cpu_per_step["quiet"]), statistics.mean(cpu_per_step["loaded"])
    print(
        f"engine CPU per step: quiet {quiet_cpu:.3f} s, loaded {loaded_cpu:.3f} s: loaded / quiet {loaded_cpu / quiet_cpu:.3f}"
    )
    print(
        f"flooding client: tried {attempts / seconds:.0f} hello/s, {sent / seconds:.0f}/s got onto the socket (the server stops reading "
        f"past its limit), {answered / seconds:.1f}/s answered"
    )
    print(
        f"this script's CPU while loading (all {args.readers + args.silent + 1} clients): {load_cpu / load_wall:.3f} cores"
    )


if __name__ == "__main__":
    sys.exit(main())
