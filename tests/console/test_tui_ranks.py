"""The System panel of a run on several ranks: the world size, and each rank's samples/s and memory now/peak on a
line of its own, or summed up (range, slowest and fullest rank named) where the panel has no room for one each;
a single process's panel as before ranks were reported."""

from __future__ import annotations

import pytest

from spu_engine.core.protocol import event
from spu_tui.app import SpuApp
from spu_tui.widgets.system_view import SystemView
from support import ScriptedLink, record_run, screen_lines

GPU = {
    "utilization": 90.0,
    "memory_used": 30 * 2**30,
    "memory_total": 80 * 2**30,
    "allocated": 2**34,
    "max_allocated": 2**35,
}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tokenizer):
    return record_run(tmp_path_factory, tokenizer, "ranks", [], steps=4, eval_every=0, system_every=0.001)


def system(step: int, world: int, slow: int | None = None, gpus: dict | None = None) -> dict:
    """A ``system`` event of ``world`` ranks at 12.5 samples/s each (rank ``slow`` at 7.0), rank r holding 1.r GiB
    and peaking at 3.r GiB (the last rank highest)."""
    ranks = [
        {
            "rank": r,
            "samples_per_s": 7.0 if r == slow else 12.5,
            "tokens_per_s": 400.0,
            "memory_gb": 1 + r / 10,
            "peak_memory_gb": 3 + r / 10,
        }
        for r in range(world)
    ]
    machine = {"tokens_per_s": 800.0 * world, "cpu_process": 99.0, "cpu_machine": 50.0, "cpu_count": 16}
    machine.update(rss=2**30, ram_used=2**33, ram_total=2**35)
    if gpus:
        machine["gpus"] = gpus
    return event("system", step=step, seconds=2.0, samples_per_s=25.0 * world, world_size=world, ranks=ranks, **machine)


def panel_text(app) -> list[str]:
    """The System panel's lines as the terminal shows them (the border and the tree cut off)."""
    view = app.query_one(SystemView)
    left, top = view.content_region.x, view.content_region.y
    lines = screen_lines(app)[top : top + view.content_region.height]
    return [line[left : left + view.content_region.width].rstrip() for line in lines]


async def test_a_single_process_shows_no_rank_lines_and_two_ranks_a_line_each(one_process_run):
    run_dir, history = one_process_run
    assert all(e["world_size"] == 1 and len(e["ranks"]) == 1 for e in history if e["type"] == "system")
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await pilot.pause(0.5)
        shown = "\n".join(panel_text(app))
        assert "samples/s" in shown and "rank" not in shown  # one process: the panel as it always was
        link.deliver(system(5, 2, slow=1))
        await pilot.pause(1.0)
        lines = panel_text(app)
        assert lines[0].split() == ["2", "ranks", "samples/s", "mem/peak"]
        assert lines[1].split()[:4] == ["rank", "0", "12.5", "1.0G/3.0G"]
        assert lines[2].split()[:4] == ["rank", "1", "7.0", "1.1G/3.1G"]
        assert any(line.split()[:2] == ["RAM", "machine"] for line in lines)  # the machine's rows below, all of them
        link.deliver(event("system", step=6, seconds=1.0, samples_per_s=9.0, cpu_process=90.0, rss=2**30))
        await pilot.pause(1.0)
        assert "rank" not in "\n".join(panel_text(app))  # an engine older than ranks: as before


@pytest.mark.parametrize(
    "size, each",  # each: a line a rank without a GPU, and with one (its four rows leave less room)
    [((80, 24), (True, False)), ((120, 36), (True, True)), ((200, 50), (False, False))],
)
async def test_eight_ranks_fit_or_are_summed_up_naming_the_slowest(one_process_run, size, each):
    run_dir, history = one_process_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=size) as pilot:
        await pilot.press("6")
        for step, gpus, line_each in ((5, None, each[0]), (6, {"0": GPU}, each[1])):
            link.deliver(system(step, 8, slow=5, gpus=gpus))
            await pilot.pause(1.0)
            lines = panel_text(app)
            assert all(len(line) <= app.query_one(SystemView).content_region.width for line in lines)
            assert "…" not in "".join(lines)  # nothing cut
            assert lines[0].split()[:2] == ["8", "ranks"]
            if line_each:
                assert [line.split()[:2] for line in lines[1:9]] == [["rank", str(r)] for r in range(8)]
                assert lines[6].split()[2:4] == ["7.0", "1.5G/3.5G"]
                assert any(line.split()[:2] == ["RAM", "machine"] for line in lines)
            else:
                assert "7.0-12.5" in lines[0] and lines[0].endswith("slowest rank 5")
                assert lines[1].split()[:2] == ["memory", "1.0G-1.7G"] and lines[1].endswith("most on rank 7")
                assert lines[2].split()[:3] == ["peak", "memory", "3.0G-3.7G"] and lines[2].endswith("most on rank 7")
                assert lines[3].split()[0] == ("GPU0" if gpus else "tokens/s")  # the machine's rows below
