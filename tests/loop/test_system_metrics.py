"""System metrics: the engine's sampler (CPU here; the GPU branch against a stand-in torch.cuda, its peak per window
included), ranks as threads agreeing on when to gather, the ``system`` events of a real run, and the console's header
and System panel drawing them."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from spu_engine.core.protocol import SystemEvent, event, read_event
from spu_engine.loop.commands import Commands
from spu_engine.loop.system_metrics import SystemSampler
from spu_engine.runtime.activation_meter import PEAKS
from spu_tui.app import SpuApp
from spu_tui.widgets.run_header import RunHeader
from spu_tui.widgets.system_view import SystemView
from support import ScriptedLink, record_run, screen_lines

CPU_FIELDS = ("cpu_process", "cpu_machine", "cpu_count", "rss", "ram_used", "ram_total")


def test_the_sampler_on_cpu_counts_trained_tokens_and_reports_no_gpu():
    sampler = SystemSampler([torch.device("cpu")], every=0.0)
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [5, 6]}]  # unpadded
    sampler.count(features)
    sampler.stepped(None)  # a step that did not count (out of memory): nor does its batch
    assert not sampler.has_steps
    sampler.count(features)
    sampler.stepped(0.5)
    assert not sampler.due()  # every 0: no event on its own
    fields = sampler.sample()
    assert fields["samples_per_s"] == 4.0 and fields["tokens_per_s"] == 10.0 and fields["seconds"] == 0.5
    assert (
        all(fields[k] is not None for k in CPU_FIELDS)
        and fields["rss"] > 0
        and fields["ram_total"] >= fields["ram_used"] > 0
    )
    assert "gpus" not in fields and not any("gpu" in k for k in fields)
    assert fields["world_size"] == 1 and [r["rank"] for r in fields["ranks"]] == [0]
    alone = fields["ranks"][0]
    assert alone["samples_per_s"] == 4.0 and alone["tokens_per_s"] == 10.0  # one process: its counts are the totals
    assert 0 < alone["memory_gb"] <= alone["peak_memory_gb"]  # the process's RSS, and its peak so far
    assert isinstance(read_event(event("system", step=1, **fields)), SystemEvent)
    assert "samples_per_s" not in sampler.sample()  # a new interval: no steps, no throughput


def test_the_gpu_branch_reads_nvml_and_falls_back_to_the_allocator(monkeypatch):
    """No GPU here: torch.cuda's readers stand in, so the fields a GPU run sends are checked all the same."""

    class Props:
        name, total_memory = "H200", 80 * 2**30

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(cuda, "memory_allocated", lambda i: 3 * 2**30)
    monkeypatch.setattr(cuda, "memory_reserved", lambda i: 4 * 2**30)
    peak = {"now": 5 * 2**30}  # torch's peak counter; a reset starts it again from what is allocated (3 GiB)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda i: peak["now"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda i: peak.update(now=3 * 2**30))
    monkeypatch.setattr(cuda, "mem_get_info", lambda i: (70 * 2**30, 80 * 2**30))
    monkeypatch.setattr(cuda, "utilization", lambda i: 87)
    monkeypatch.setattr(cuda, "device_memory_used", lambda i: 12 * 2**30)
    sampler = SystemSampler([torch.device("cuda", 1)], every=10.0)
    sampler.nvml = True
    fields = sampler.sample()
    gpu = fields["gpus"]["1"]
    assert fields["ranks"] == [{"rank": 0, "memory_gb": 3.0, "peak_memory_gb": 5.0}]  # the allocator's, one peak read
    assert gpu == {
        "name": "H200",
        "memory_total": 80 * 2**30,
        "allocated": 3 * 2**30,
        "reserved": 4 * 2**30,
        "max_allocated": 5 * 2**30,
        "utilization": 87.0,
        "memory_used": 12 * 2**30,
    }

    peak["now"] = 6 * 2**30  # a step of the next window peaks at 6 GiB, then a measured step resets the counter
    PEAKS.begin_step(1)
    peak["now"] = 4 * 2**30
    assert sampler.sample()["gpus"]["1"]["max_allocated"] == 6 * 2**30  # the window's peak all the same
    assert sampler.sample()["gpus"]["1"]["max_allocated"] == 3 * 2**30  # a new window: only what is allocated

    def no_driver(i):
        raise RuntimeError("NVML: insufficient permissions")

    monkeypatch.setattr(cuda, "utilization", no_driver)
    gpu = sampler.sample()["gpus"]["1"]
    assert "utilization" not in gpu and gpu["memory_used"] == 10 * 2**30  # the driver's free memory
    assert sampler.nvml is False


class World:
    """Ranks as threads: a collective exchanges every rank's value at a barrier, and one that not every rank enters
    times out (BrokenBarrierError) where torch.distributed would hang."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=10)
        self.slots: list = [None] * size

    def exchange(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class RankDist:
    """What ``Commands.take`` uses of ``Distributed``: rank 0's value on every rank."""

    def __init__(self, world: World, rank: int) -> None:
        self.world, self.rank, self.is_main = world, rank, rank == 0

    def broadcast(self, value):
        return self.world.exchange(self.rank, value)[0]


def _rank(world: World, rank: int, every: float, batch: list[dict], steps: int = 3) -> list:
    """One rank's loop as the engine runs it: the boundary's broadcast, a step, and a sample when due."""
    sampler = SystemSampler([torch.device("cpu")], every, 2, rank, gather=lambda r: world.exchange(rank, r))
    commands = Commands(SimpleNamespace(dist=RankDist(world, rank), system=sampler))  # type: ignore[arg-type]
    sent = []
    for step in range(1, steps + 1):
        commands.take(block=False, stop_signal=None)
        sampler.count(batch)
        sampler.stepped(0.5)
        if sampler.due():
            sent.append((step, sampler.sample()))
    if sampler.has_steps:  # the run's last sample
        sent.append(("last", sampler.sample()))
    return sent


@pytest.mark.parametrize("zero_every, one_every", [(3600.0, 1e-9), (1e-9, 3600.0)])
def test_rank_zero_decides_and_every_rank_gathers_after_the_same_step(zero_every, one_every):
    """Rank 1's clock (either way) is never asked: rank 0's word rides the boundary's broadcast, so both ranks enter
    each gather together; rank 0 gets every rank's own throughput and memory, totals as before."""
    world = World(2)
    two = [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6]}]
    with ThreadPoolExecutor(2) as pool:
        zero = pool.submit(_rank, world, 0, zero_every, two)
        one = pool.submit(_rank, world, 1, one_every, two[:1])
        zero_sent, one_sent = zero.result(timeout=30), one.result(timeout=30)
    when = ["last"] if zero_every > 1 else [1, 2, 3]
    assert [s for s, _ in zero_sent] == when and [s for s, _ in one_sent] == when
    assert all(fields is None for _, fields in one_sent)  # only rank 0 emits
    for _, fields in zero_sent:
        assert fields["world_size"] == 2 and fields["samples_per_s"] == 8.0  # rank 0's 2 samples a 0.5 s step, twice
        zero_read, one_read = fields["ranks"]
        assert (zero_read["rank"], zero_read["samples_per_s"], zero_read["tokens_per_s"]) == (0, 4.0, 10.0)
        assert (one_read["rank"], one_read["samples_per_s"], one_read["tokens_per_s"]) == (1, 2.0, 6.0)
        assert all(0 < r["memory_gb"] <= r["peak_memory_gb"] for r in fields["ranks"])
        assert isinstance(read_event(event("system", step=3, **fields)), SystemEvent)


def test_a_short_run_writes_system_events_with_cpu_ram_and_throughput(make_engine, tmp_path):
    run_dir = tmp_path / "run"
    engine = make_engine(run_dir=run_dir, steps=6, system_every=0.001)
    engine.run()
    engine.close()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    system = [e for e in events if e["type"] == "system"]
    assert [e["step"] for e in system] == [1, 2, 3, 4, 5, 6]  # every step here, as system_every is tiny
    for e in system:
        assert e["samples_per_s"] > 0 and e["tokens_per_s"] > e["samples_per_s"]  # sentences of more than one token
        assert all(e[k] is not None for k in CPU_FIELDS)
        if not torch.cuda.is_available():
            assert "gpus" not in e
    trained = sum(e["samples_per_s"] * e["seconds"] for e in system)
    assert trained == pytest.approx(6 * 8, rel=0.02)  # every sample of the 6 batches of 8, and nothing else


def test_selective_backprop_counts_the_samples_it_trains_not_those_it_only_scored(make_engine, tmp_path):
    from spu_engine.core.policy import Policy

    run_dir = tmp_path / "run"
    policy = Policy.model_validate({"selective_backprop": {"mode": "percentile", "keep": 0.5}})
    engine = make_engine(run_dir=run_dir, policy=policy, steps=4, system_every=0.001)
    engine.run()
    engine.close()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    system = [e for e in events if e["type"] == "system"]
    assert engine.samples_seen > 4 * 8  # it drew more than it trained on
    assert sum(e["samples_per_s"] * e["seconds"] for e in system) == pytest.approx(4 * 8, rel=0.02)


def test_the_last_steps_get_a_system_event_even_in_a_run_shorter_than_the_interval(make_engine, tmp_path):
    run_dir = tmp_path / "run"
    engine = make_engine(run_dir=run_dir, steps=3, system_every=3600.0)
    engine.run()
    engine.close()
    system = [
        json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if '"type":"system"' in line
    ]
    assert [e["step"] for e in system] == [3]


@pytest.fixture(scope="module")
def system_run(tmp_path_factory, tokenizer):
    return record_run(tmp_path_factory, tokenizer, "system", [], steps=8, eval_every=4, system_every=0.001)


async def test_header_and_panel_show_the_system_metrics_and_no_gpu_on_cpu(system_run):
    run_dir, history = system_run
    last = [e for e in history if e["type"] == "system"][-1]
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.5)
        assert len(app.state.system) == 8
        text = "\n".join(screen_lines(app))
        header = str(app.query_one(RunHeader).render())
        assert f"CPU {last['cpu_process']:.0f}%" in header and f"RAM {last['rss'] / 2**30:.1f}G" in header
        tokens = app.state.samples_per_s * last["tokens_per_s"] / last["samples_per_s"]  # on the header's clock
        assert f"{app.state.samples_per_s:,.1f} samples/s  {tokens:,.0f} tokens/s" in header
        panel = str(app.query_one(SystemView).render())
        for label in ("tokens/s", "samples/s", "CPU engine", "CPU machine", "RAM engine", "RAM machine"):
            assert label in panel and label in text
        assert "▁" in panel or "█" in panel or any(c in panel for c in "▂▃▄▅▆▇")  # the sparklines
        assert "GPU" not in text  # nothing about a GPU this machine does not have
        await pilot.resize_terminal(80, 24)
        await pilot.press("6")
        await pilot.pause(0.3)
        text = "\n".join(screen_lines(app))
        assert "tokens/s" in text and "CPU engine" in text and "GPU" not in text


async def test_a_gpu_sample_shows_in_the_header_and_the_panel(system_run):
    run_dir, history = system_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    gpu = {
        "name": "H200",
        "utilization": 87.0,
        "memory_used": 12 * 2**30,
        "memory_total": 80 * 2**30,
        "allocated": 9 * 2**30,
        "max_allocated": 10 * 2**30,
    }
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        link.deliver(
            event(
                "system",
                step=9,
                seconds=1.0,
                samples_per_s=8.0,
                tokens_per_s=120.0,
                cpu_process=99.0,
                rss=2**30,
                gpus={"0": gpu},
            )
        )
        await pilot.pause(1.5)
        header = str(app.query_one(RunHeader).render())
        assert "GPU0 87% 12.0G/80.0G" in header
        panel = str(app.query_one(SystemView).render())
        assert (
            "GPU0 util" in panel
            and "87 %" in panel
            and "GPU0 mem" in panel
            and "12.0G/80.0G" in panel
            and "GPU0 torch" in panel
            and "GPU0 peak" in panel
            and "10.0G" in panel
        )
