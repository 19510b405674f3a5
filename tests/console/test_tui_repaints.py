"""What a frame of training progress repaints: each changed view's own box, each changed row's own line (issue 30).

Textual repaints the box around everything refreshed together and re-renders every widget inside it: the header
at the top and the log at the bottom drawn at once re-rendered the ~100 controls between them, a unit's new share
re-rendered each of its tensors' rows, and new unit statistics laid the whole screen out again.  Counted in
renders and layouts, never in milliseconds.
"""

from __future__ import annotations

from collections import Counter

from textual.scrollbar import ScrollBar
from textual.widget import Widget

from spu_tui.app import SpuApp
from spu_tui.widgets.controls import ControlsPanel
from spu_tui.widgets.run_charts import SparsityChart
from spu_tui.widgets.run_header import RunHeader
from spu_tui.widgets.unit_tree import Row, UnitTree
from support import ScriptedLink, scripted_hello, wait_for

UNITS = ["embeddings", "block0", "block1", "head"]
TENSORS = [f"t{i}" for i in range(6)]


def hello() -> dict:
    ev = scripted_hello(UNITS)
    ev["units"] = [
        {"name": u, "numel": 60, "params": [{"name": f"{u}.{t}", "numel": 10} for t in TENSORS]} for u in UNITS
    ]
    return ev


def progress(step: int) -> list[dict]:
    """A step and unit statistics whose values move (sparsity grows), for the same units."""
    stats = {"trainable": 1.0, "grad_norm": 0.1, "update_ratio": 0.01, "sparsity": step / 100}
    return [
        {"type": "step", "t": 1.0 + step, "step": step, "loss": 1.0 / step, "step_time": 0.5},
        {"type": "units", "t": 1.0 + step, "step": step, "units": dict.fromkeys(UNITS, stats)},
    ]


async def settled(pilot, app) -> None:
    await wait_for(pilot, lambda: not app.screen.stale_views(), "every view drawn")
    await pilot.pause(0.2)  # the refreshes after the last view


async def test_a_frame_of_progress_repaints_its_views_not_the_controls_between_them(tmp_path, monkeypatch):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    rendered: Counter[str] = Counter()
    render_lines = Widget.render_lines

    def counted(self, crop):
        inside = any(isinstance(w, ControlsPanel) for w in self.ancestors) and not isinstance(self, ScrollBar)
        rendered["controls" if inside else "views"] += 1  # the panel's own frame and scrollbar border the plots
        return render_lines(self, crop)

    async with app.run_test(size=(200, 50)) as pilot:
        link.deliver(hello(), *progress(1))
        await wait_for(pilot, lambda: app.query_one(RunHeader).step == 1, "the first frame")
        await settled(pilot, app)
        monkeypatch.setattr(Widget, "render_lines", counted)
        for step in range(2, 5):
            link.deliver(*progress(step))
            await wait_for(pilot, lambda: app.query_one(RunHeader).step == step, "a frame of progress")  # noqa: B023
            await settled(pilot, app)
        assert app.screen.has_class("-wide") and app.query_one(ControlsPanel).region.area > 0
        assert rendered["views"] > 0, "the header, the tree and the plots were repainted"
        assert rendered["controls"] == 0, "nothing in the controls changed: none of their fields was rendered"


async def test_a_units_new_share_repaints_its_line_not_its_tensors(tmp_path, monkeypatch):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        link.deliver(hello(), *progress(1))
        tree = app.query_one(UnitTree)
        await wait_for(pilot, lambda: Row("tensor", "block1.t5") in tree.rows, "the tree's rows")
        tree.move_to(Row("tensor", "block1.t5"))
        await settled(pilot, app)
        lines: list[int] = []
        render_line = UnitTree.render_line
        monkeypatch.setattr(UnitTree, "render_line", lambda self, y: lines.append(y) or render_line(self, y))
        link.deliver(
            {
                "type": "policy",
                "t": 3.0,
                "step": 2,
                "source": "console",
                "change": {"freeze": [{"match": "block1.t0", "trainable": False}]},
                "frozen_tensors": ["block1.t0"],
                "trainable_by_unit": {"block1": 5 / 6},
            },
            progress(2)[0],
        )
        await settled(pilot, app)
        unit, tensor = (tree._row_nodes[Row(*r)].line for r in (("unit", "block1"), ("tensor", "block1.t0")))
        assert "○" in str(tree._row_nodes[Row("tensor", "block1.t0")].label) or "frozen" in str(
            tree._row_nodes[Row("tensor", "block1.t0")].label
        ), "the frozen tensor is drawn frozen"
        assert sorted(set(lines)) == sorted({unit, tensor}), "the unit's line and the frozen tensor's, no other"


async def test_new_unit_statistics_lay_nothing_out(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        link.deliver(hello(), *progress(1))
        await wait_for(pilot, lambda: app.query_one(RunHeader).step == 1, "the first frame")
        await settled(pilot, app)
        layouts: list[int] = []
        lay_out = app.screen._refresh_layout
        app.screen._refresh_layout = lambda *a, **k: layouts.append(1) or lay_out(*a, **k)
        for step in range(2, 5):
            link.deliver(*progress(step))
            await wait_for(pilot, lambda: app.query_one(RunHeader).step == step, "a frame of progress")  # noqa: B023
            await settled(pilot, app)
        bars = app.query_one(SparsityChart).query_one("BarRows")
        assert "4%" in str(bars.render()), "the bars show the newest sparsity"
        assert layouts == [], "new values for the same units keep every widget's size: no whole-screen layout"
