"""What one toggle key costs the console: CPU and calls from the key to the frame that shows the engine received it.

    PYTHONPATH=<tree> python bench/key_path.py [--toggles 16] [--step 0.5] [--profile]

Wall-clock latencies move with the machine's load; the console's own CPU time and
what it calls do not, so this compares trees (e.g. an old commit's worktree on
PYTHONPATH against this one) on a loaded machine.  The real ``SpuApp`` runs
headless (200x50, every panel shown) against a scripted engine: a MiniLM-shaped
model (embeddings, six blocks of 16 tensors, head), a step every ``--step``
seconds (a units event every 10th, a system event every 4th), a ``received``
event 1 ms after each command and its policy event, then the ack, at the next step
boundary, as the engine's socket and training threads send them.  It prints:

- CPU ms of the console process per toggle, key -> the redraw showing the received
  mark (the bench's ``key -> received -> redraw``), median and max;
- CPU ms per toggle over the whole toggle (up to the redraw showing it applied);
- console CPU (cores) while watching (no key) and while toggling;
- ``--bare-keys`` sends the key as ``Pilot.press`` does but skips its wait for
  every widget on screen to run a callback (``bench/ui_latency.py`` presses with
  Pilot: that wait runs beside the key's own path, and costs with the widget count);
- with ``--profile``: calls per toggle, key -> received mark, of the console's
  drawing functions (tree rebuilds and relabels, plots, header, ...), and the
  functions taking the most CPU then.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")

try:
    from spu_engine.core.policy import Change, Policy
except ImportError:  # 4809a16's layout
    from spu_engine.policy import Change, Policy
from spu_tui.app import SpuApp
from spu_tui.link import EventsArrived
from spu_tui.widgets.unit_tree import Row, UnitTree

BLOCK = [
    f"{part}.{kind}"
    for part in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for kind in ("weight", "bias")
]
WATCHED = (  # (file ending, function): the drawing the key path may do
    ("unit_tree.py", "show"),
    ("unit_tree.py", "_sync_rows"),
    ("unit_tree.py", "relabel"),
    ("unit_tree.py", "_label"),
    ("tree.py", "set_label"),
    ("tree.py", "_refresh_line"),
    ("tree.py", "_invalidate"),
    ("tree.py", "render_lines"),
    ("chart.py", "redraw"),
    ("run_charts.py", "show"),
    ("learning_view.py", "show"),
    ("run_header.py", "show"),
    ("controls.py", "show"),
    ("controls.py", "load"),
    ("system_view.py", "show"),
    ("log_panel.py", "show"),
    ("panels.py", "_frame"),
    ("app.py", "_frame"),
    ("widget.py", "refresh"),
    ("screen.py", "_refresh_layout"),
    ("_compositor.py", "reflow"),
    ("_compositor.py", "render_update"),
)


def units() -> list[dict[str, Any]]:
    def unit(name: str, tensors: list[tuple[str, int]]) -> dict[str, Any]:
        params = [{"name": n, "numel": k, "shape": [k], "trainable": True} for n, k in tensors]
        return {"name": name, "numel": sum(k for _, k in tensors), "params": params}

    emb = [("embeddings.word_embeddings.weight", 30522 * 384), ("embeddings.position_embeddings.weight", 512 * 384)]
    emb += [("embeddings.LayerNorm.weight", 384), ("embeddings.LayerNorm.bias", 384)]
    blocks = [
        unit(f"block{i}", [(f"encoder.layer.{i}.{t}", 384 * 384 if t.endswith("weight") else 384) for t in BLOCK])
        for i in range(6)
    ]
    head = [("pooler.dense.weight", 384 * 384), ("pooler.dense.bias", 384), ("classifier.weight", 768)]
    return [unit("embeddings", emb), *blocks, unit("head", head)]


class ScriptedEngine:
    """The engine's side of the link: steps on a clock, commands received at once and applied at the next step."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.target: Any = None
        self.units = units()
        self.frozen: set[str] = set()
        self.policy = Policy()  # what the engine has in force: the console lists its rules
        self.step = 0
        self._events: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = False
        self._due: list[dict[str, Any]] = []  # commands received, applied at the next boundary
        self._stop = threading.Event()
        self._sent = 0

    # -- the console's Link (both the current Link protocol and 4809a16's EngineLink)
    connected = True

    def connect(self, target: Any = None, timeout: float = 60.0) -> None:
        if target is not None:
            self.target = target
        self.put(self.hello())
        threading.Thread(target=self._train, daemon=True).start()

    def drain(self) -> list[dict[str, Any]]:
        with self._lock:
            self._wake = False
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def send(self, cmd: str, **fields: Any) -> str:
        self._sent += 1
        cid = f"c{self._sent}"
        command = {"id": cid, "cmd": cmd, **fields}
        threading.Timer(0.001, self._received, [command]).start()
        return cid

    def close(self) -> None:
        self._stop.set()

    # -- engine side

    def put(self, ev: dict[str, Any]) -> None:
        ev.setdefault("t", time.time())
        self._events.append(ev)
        with self._lock:
            if self._wake:
                return
            self._wake = True
        self.target.post_message(EventsArrived())

    def hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "run": "run",
            "state": "training",
            "step": 0,
            "total_steps": 100_000,
            "config": {"model": "minilm", "steps": 100_000},
            "units": self.units,
            "current": {},
        }

    def _received(self, command: dict[str, Any]) -> None:
        self.put({"type": "received", "id": command["id"], "cmd": command["cmd"], "step": self.step})
        with self._lock:
            self._due.append(command)

    def _train(self) -> None:
        while not self._stop.wait(self.step_s):
            with self._lock:
                due, self._due = self._due, []
            for command in due:
                self._apply(command)
            self.step += 1
            self.put(
                {
                    "type": "step",
                    "step": self.step,
                    "loss": 0.7 - 0.0001 * self.step,
                    "lr": 2e-5,
                    "grad_norm": 1.0,
                    "step_time": self.step_s,
                    "samples_per_s": 32 / self.step_s,
                    "samples": 32 * self.step,
                    "batch_size": 32,
                }
            )
            if self.step % 4 == 0:
                self.put({"type": "system", "step": self.step, "seconds": 4 * self.step_s, "cpu_process": 190.0})
            if self.step % 10 == 0:
                self.put(self._stats())

    def _apply(self, command: dict[str, Any]) -> None:
        if command["cmd"] == "change":
            for rule in command["change"].get("freeze", []):
                if rule.get("match"):
                    (self.frozen.discard if rule.get("trainable") else self.frozen.add)(rule["match"])
            self.policy = self.policy.apply(Change.model_validate(command["change"]))
            by_unit = {
                u["name"]: sum(p["numel"] for p in u["params"] if p["name"] not in self.frozen) / u["numel"]
                for u in self.units
            }
            self.put(
                {
                    "type": "policy",
                    "step": self.step,
                    "source": "console",
                    "change": command["change"],
                    "policy": self.policy.model_dump(mode="json"),
                    "trainable": 22_000_000,
                    "trainable_by_unit": by_unit,
                    "frozen_tensors": sorted(self.frozen),
                }
            )
        self.put({"type": "ack", "id": command["id"], "cmd": command["cmd"], "ok": True, "step": self.step})

    def _stats(self) -> dict[str, Any]:
        stats = {
            u["name"]: {"trainable": 1.0, "grad_norm": 0.5, "update_ratio": 1e-3, "sparsity": 0.0} for u in self.units
        }
        tensors = {p["name"]: {"trainable": p["name"] not in self.frozen} for u in self.units for p in u["params"]}
        return {"type": "units", "step": self.step, "units": stats, "tensors": tensors}


def console(run_dir: Path, engine: ScriptedEngine) -> SpuApp:
    """The app on ``engine``: today's takes a ``link``; 4809a16's made its own, replaced here before it mounts."""
    try:
        return SpuApp(run_dir, link=engine)
    except TypeError:
        app = SpuApp(run_dir, connect=False)
        app.link = engine
        engine.target = app
        return app


def received_seconds(app: SpuApp) -> list[float]:
    """Key -> engine received -> redraw, as the app timed each (``bench/ui_latency.py``'s figure)."""
    trips = getattr(app, "round_trips", None)
    return trips.received if trips is not None else app.received_roundtrips


def received_count(app: SpuApp) -> int:
    return len(received_seconds(app))


def applied_count(app: SpuApp) -> int:
    trips = getattr(app, "round_trips", None)
    return len(trips.applied) if trips is not None else len(app.roundtrips)


async def until(check, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError("the console did not draw the engine's answer")
        await asyncio.sleep(0.002)


async def measure(args: argparse.Namespace) -> None:
    engine = ScriptedEngine(args.step)
    app = console(Path(tempfile.mkdtemp(prefix="spu-key-path-")) / "run", engine)
    async with app.run_test(size=(200, 50)) as pilot:
        await until(lambda: bool(app.state.units))
        tensor = app.state.units[-2]
        name = tensor.params[-1].name if hasattr(tensor, "params") else tensor["params"][-1]["name"]
        app.query_one(UnitTree).move_to(Row("tensor", name))
        await asyncio.sleep(4 * args.step)  # the first full paint and a few steps

        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(args.watch)
        watching = (time.process_time() - cpu) / (time.monotonic() - wall)

        to_received, whole = [], []
        profile = (cProfile.Profile(), cProfile.Profile()) if args.profile else None
        cpu, wall = time.process_time(), time.monotonic()
        for _ in range(args.toggles):
            got, done = received_count(app), applied_count(app)
            start = time.process_time()
            if profile is not None:
                profile[0].enable()
            if args.bare_keys:
                await app._press_keys(["space"])  # as Pilot.press, without its wait for every widget on screen
            else:
                await pilot.press("space")
            await until(lambda: received_count(app) > got)  # noqa: B023
            if profile is not None:
                profile[0].disable()
                profile[1].enable()
            to_received.append(1000 * (time.process_time() - start))
            await until(lambda: applied_count(app) > done)  # noqa: B023
            if profile is not None:
                profile[1].disable()
            whole.append(1000 * (time.process_time() - start))
        toggling = (time.process_time() - cpu) / (time.monotonic() - wall)
        engine.close()

    n = args.toggles
    print(f"console {sys.modules['spu_tui'].__file__}")
    print(f"toggles {n}, a step every {args.step} s")
    print(
        f"CPU ms key -> received mark drawn: median {statistics.median(to_received):.1f}  max {max(to_received):.1f}"
        + ("  (profiled: inflated)" if profile else "")
    )
    print(f"CPU ms key -> applied drawn:       median {statistics.median(whole):.1f}  max {max(whole):.1f}")
    print(f"console CPU, cores: watching {watching:.4f}  toggling {toggling:.4f}")
    wall = sorted(1000 * s for s in received_seconds(app))
    print(
        f"wall ms key -> received -> redraw (moves with the machine's load): p50 {wall[len(wall) // 2]:.1f}  "
        f"max {wall[-1]:.1f}"
    )
    if profile is not None:
        report(profile[0], n, args.top, "key -> received mark drawn")
        report(profile[1], n, args.top, "received mark drawn -> applied drawn")


def report(profile: cProfile.Profile, n: int, top: int, what: str) -> None:
    """Calls per toggle of the drawing functions, and the console's functions taking the most CPU, in ``what``."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    print(f"calls per toggle, {what} (cumulative ms per toggle, profiled):")
    for ending, func in WATCHED:
        calls = sum(s[1] for (f, _, fn), s in stats.items() if f.endswith("/" + ending) and fn == func)
        cum = sum(s[3] for (f, _, fn), s in stats.items() if f.endswith("/" + ending) and fn == func)
        if calls:
            print(f"  {ending + ':' + func:<32} {calls / n:8.1f}  {1000 * cum / n:8.2f} ms")
    print(f"most cumulative CPU per toggle in the console's own code, {what}:")
    own = [(s[3], f, fn, s[1]) for (f, _, fn), s in stats.items() if "/spu_tui/" in f]
    for cum, f, fn, calls in sorted(own, reverse=True)[:top]:
        print(f"  {1000 * cum / n:8.2f} ms  {calls / n:6.1f} calls  {f.split('/spu_tui/')[1]}:{fn}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toggles", type=int, default=16)
    parser.add_argument("--step", type=float, default=0.5, help="seconds between the scripted engine's steps")
    parser.add_argument("--watch", type=float, default=8.0, help="seconds of watching (no key) measured first")
    parser.add_argument("--profile", action="store_true", help="count the calls of the key path (cProfile)")
    parser.add_argument(
        "--bare-keys",
        action="store_true",
        help="press keys without Pilot.press's wait for every widget on screen (a test harness's cost, not a user's)",
    )
    parser.add_argument("--top", type=int, default=15)
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
