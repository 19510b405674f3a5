"""The freeze advisor: per-unit trends, the front blocks whose gradient norm settled, and `v` that previews then applies it."""

from __future__ import annotations

import pytest

from spu_engine.core.freeze_advice import advise, relative_slope, trends
from spu_tui.app import SpuApp
from spu_tui.widgets.learning_view import LearningView
from support import ScriptedLink, record_run, screen_lines

BLOCKS = ["block0", "block1", "block2", "block3"]


def norms_at(i: int) -> dict[str, float]:
    """Blocks 0 and 1 have settled, block 2 still moves, block 3 has settled behind it."""
    return {
        "embeddings": 0.5,
        "block0": 1.0,
        "block1": 2.0 + 0.001 * i,
        "block2": 1.0 + 0.3 * i,
        "block3": 3.0,
        "head": 0.7,
    }


def snapshot(i: int) -> dict[str, tuple[float, float]]:
    return {u: (g, 1e-4) for u, g in norms_at(i).items()}


def test_the_advice_names_the_settled_front_blocks_and_stops_at_the_first_that_moves():
    history = [snapshot(i) for i in range(12)]
    advice = advise(history, BLOCKS, set(BLOCKS))
    assert advice is not None and advice.blocks == ["block0", "block1"]  # block3 settled too, but behind block2
    assert advice.reason.startswith("blocks 0-1: grad-norm change < 5% over 3 intervals of 3 stats")
    assert advise(history[:11], BLOCKS, set(BLOCKS)) is None  # too few statistics
    assert advise(history, BLOCKS, {"block1", "block2", "block3"}).blocks == [
        "block1"
    ]  # block0 frozen already: passed over


def test_trends_are_slopes_relative_to_the_level():
    assert relative_slope([1.0, 1.0, 1.0]) == 0.0
    assert relative_slope([1.0, 2.0, 3.0]) == pytest.approx(0.5)  # 1 a step at a mean of 2
    assert relative_slope([1.0, 2.0]) is None
    rows = {t.unit: t for t in trends([snapshot(i) for i in range(8)], ["block0", "block2"])}
    assert (
        rows["block0"].grad_trend == 0.0
        and rows["block2"].grad_trend > 0.1
        and rows["block2"].grad_norm == pytest.approx(3.1)
    )


@pytest.fixture(scope="module")
def advised_run(tmp_path_factory, tokenizer):
    """A short real run's history, then twelve statistics events in which blocks 0 and 1 have settled."""
    run_dir, history = record_run(tmp_path_factory, tokenizer, "advised", [], steps=2, eval_every=0, stats_every=1)
    last = history[-1]["t"]
    scripted = [
        {
            "type": "units",
            "t": last + i,
            "step": 10 + i,
            "tensors": {},
            "units": {
                u: {"trainable": 1.0, "grad_norm": g, "update_ratio": 1e-4, "sparsity": 0.0}
                for u, g in norms_at(i).items()
            },
        }
        for i in range(12)
    ]
    return run_dir, [*history, *scripted]


async def test_v_previews_the_advice_then_applies_it_as_a_freeze_change(advised_run):
    run_dir, history = advised_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        view = app.query_one(LearningView)
        assert view.advice is not None and view.advice.blocks == ["block0", "block1"]
        text = "\n".join(screen_lines(app))
        assert view.advice_line.startswith("advice: freeze blocks 0-1: grad-norm change < 5% over 3 intervals")
        assert "advice: freeze blocks 0-1" in text
        assert "→0% →0%" in text and "↗9%" in text  # block0's flat gradient norm, block2's rising one

        await pilot.press("v")
        preview = [fields for cmd, fields in link.sent if cmd == "preview"]
        wanted = {"freeze": [{"units": ["embeddings"], "trainable": False}, {"layers": [0, 1], "trainable": False}]}
        assert preview == [{"change": wanted}] and link.changes() == []  # a what-if first, nothing applied
        t = max(e.get("t", 0) for e in history) + 1
        link.deliver(
            {
                "type": "preview",
                "t": t,
                "id": f"c{len(link.sent)}",
                "trainable": 1000,
                "total": 4000,
                "trainable_now": 2000,
                "backward": 0.5,
                "frozen_prefix_backward": 0.5,
                "notes": [],
            }
        )
        await pilot.pause(0.3)
        assert view.whatif == "→ trainable 1,000 (25.0%), backward ≈ 50%; v again applies"
        assert "→ trainable 1,000 (25.0%)" in "\n".join(screen_lines(app))

        await pilot.press("v")
        assert link.changes() == [wanted]
        await pilot.press("z")
        assert link.sent[-1][0] == "undo"


async def test_v_without_advice_says_why(advised_run):
    run_dir, history = advised_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history[:-1], link=link)  # eleven statistics: one too few
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("v")
        await pilot.pause(0.1)
        assert link.sent == [] or all(cmd != "preview" for cmd, _ in link.sent)
        assert any("no front block has settled yet" in line.text for line in app.state.log)


async def test_automatic_freezing_is_a_controls_section_previewed_then_applied(advised_run):
    run_dir, history = advised_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        app.query_one("#af-method").value = "lisa"
        await pilot.pause(0.2)
        cmd, fields = link.sent[-1]
        assert cmd == "preview" and fields["change"]["set"]["auto_freeze"]["method"] == "lisa"
        app.query_one("#apply-auto_freeze").press()
        await pilot.pause(0.2)
        cmd, fields = link.sent[-1]
        assert cmd == "change" and fields["change"]["set"]["auto_freeze"] == {
            "method": "lisa",
            "interval": 20,
            "n_layers": 2,
            "embeddings": True,
            "head": True,
            "percentile": 50.0,
            "allow_gaps": False,
            "optimizer_state": "keep",
        }
