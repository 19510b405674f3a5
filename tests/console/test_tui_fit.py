"""What must stay readable at the sizes terminals open at (80x24, 120x36), where panels show one at a time.

A finished 16-block tiny-BERT run with a frozen prefix (embeddings and blocks 0-11), LoRA on query and value, and a
trigger that fired (freezing block12): the Learning panel shows the blocks that train, the controls reach the PEFT section, the
trigger's ✓ and step show, the sparsity panel labels every bar, the run browser shows methods and when.
"""

from __future__ import annotations

import re

import pytest

from spu_engine.core.policy_files import parse_policy
from spu_engine.core.runs import read_history
from spu_tui.app import SpuApp
from spu_tui.widgets.unit_tree import UnitTree
from support import screen_lines, small_sst2

SIZES = [(80, 24), (120, 36)]
FIRES = {"at": {"epoch": 1}, "freeze": [{"units": ["block12"], "trainable": False}]}
POLICY = {
    "freeze": [{"units": ["embeddings"], "trainable": False}, {"layers": "0-11", "trainable": False}],
    "peft": {"method": "lora", "r": 2},
    "timeline": [FIRES],
}


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory, tokenizer):
    """12 steps of 8 a batch over 64 samples: the epoch-1 trigger fires at step 8."""
    from spu_engine.loop.engine import Engine, EngineConfig
    from spu_engine.tasks import TaskOptions
    from spu_engine.tasks.classification import ClassificationTask
    from support import build_tiny

    run_dir = tmp_path_factory.mktemp("runs") / "deep-frozen-prefix-lora"
    run_dir.mkdir()
    data = small_sst2(tmp_path_factory.mktemp("sst2"))
    task = ClassificationTask.build(
        str(data), tokenizer, TaskOptions(max_length=32, max_train_samples=64, max_eval_samples=16)
    )
    config = EngineConfig(
        model="tiny", data=str(data), steps=12, batch_size=8, lr=1e-3, warmup=0, eval_every=6, stats_every=2
    )
    model = build_tiny("bert", tokenizer, num_hidden_layers=16)
    engine = Engine(config, parse_policy(POLICY), run_dir, model=model, tokenizer=tokenizer, task=task)
    engine.run()
    engine.close()
    return run_dir, read_history(run_dir)


def region_lines(app, selector: str) -> list[str]:
    """The screen's text inside the widget ``selector`` (its border left out), a line each."""
    region = app.screen.query_one(selector).content_region
    lines = screen_lines(app)
    return [line[region.x : region.right] for line in lines[region.y : region.bottom]]


async def opened(pilot, app, key: str) -> None:
    await pilot.pause(0.4)
    await pilot.press(key)
    await pilot.pause(0.4)


@pytest.mark.parametrize("size", SIZES)
async def test_learning_shows_the_blocks_that_train(deep_run, size):
    run_dir, history = deep_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=size) as pilot:
        await opened(pilot, app, "3")
        lines = region_lines(app, "#learning")
        for unit in ("block13", "block14", "block15", "head"):
            row = next((line for line in lines if line.split()[:1] == [unit]), None)
            assert row is not None and re.search(r"\d\.\de-\d\d", row), f"{unit} is not on screen: {lines}"
        if size == (80, 24):  # a row a unit does not fit: the frozen ones fold into one line
            assert any("frozen: embeddings, block0-12" in line for line in lines)


@pytest.mark.parametrize("size", SIZES)
async def test_the_peft_section_is_reachable_and_readable(deep_run, size):
    run_dir, history = deep_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=size) as pilot:
        await opened(pilot, app, "4")
        app.query_one("#peft-method").focus()
        await pilot.pause(0.4)
        text = "\n".join(region_lines(app, "#controls"))
        assert "PEFT" in text and re.search(r"method +lora", text) and re.search(r"LoRA rank +2", text)
        assert re.search(r"LoRA\+ ratio", text), "the section's fields below the method are on screen too"


@pytest.mark.parametrize("size", SIZES)
async def test_a_fired_trigger_shows_its_check_and_step(deep_run, size):
    run_dir, history = deep_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=size) as pilot:
        await opened(pilot, app, "4")
        app.query_one("#scheduled").focus()
        await pilot.pause(0.4)
        shown = " ".join(" ".join(region_lines(app, "#scheduled RemovableItem")).split())
        assert "epoch 1: freeze block12 ✓ fired at step 8" in shown


@pytest.mark.parametrize("size", SIZES)
async def test_the_sparsity_panel_labels_every_bar(deep_run, size):
    run_dir, history = deep_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=size) as pilot:
        await opened(pilot, app, "2")
        lines = region_lines(app, "#sparsity")
        units = [u.name for u in app.state.units]
        bars = [line.split()[0] for line in lines if re.search(r"\d+%", line)]
        assert bars == units, f"a label a bar, in the model's order: {lines}"


@pytest.mark.parametrize("size", SIZES)
async def test_the_run_browser_shows_the_name_methods_and_when(deep_run, size):
    run_dir, history = deep_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=size) as pilot:
        await opened(pilot, app, "b")
        await pilot.pause(0.4)
        text = " ".join(" ".join(screen_lines(app)).split())
        assert run_dir.name in text, "the name attach takes is whole"
        assert "LoRA r2" in text and "freeze rules" in text, "the methods column"
        assert re.search(r"\d{4}-\d\d-\d\d", text) and re.search(r" \d\d:\d\d ", text) and "when" in text
        assert "12/12" in text and "accuracy" in text


@pytest.mark.parametrize("size", SIZES)
async def test_tree_rows_keep_lora_tensors_apart_and_marks_aligned(deep_run, size):
    run_dir, history = deep_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.4)
        await pilot.press(*["down"] * 14, "right", *["down"] * 3)  # block13, its query's lora_A
        await pilot.pause(0.4)
        tree = app.query_one(UnitTree)
        block = next(node for node in tree.root.children if node.data.name == "block13")
        labels = [str(node.label) for node in [*tree.root.children, *block.children]]
        lora = [label.split()[0] for label in labels if "lora_" in label]
        assert len(lora) == 4 and len(set(lora)) == 4, f"query and value adapters read apart: {lora}"
        assert all(name.endswith(".weight") for name in lora), "a name never loses its end"
        assert len({len(label) for label in labels}) == 1, f"every row's marks end in the same column: {labels}"
        shown = [line for line in region_lines(app, "#tree") if "lora_A" in line]
        assert shown and shown[0].split()[1] == lora[0], "the cursor's row is on screen, as its label says"
        full = " ".join(line.strip() for line in region_lines(app, "#tree-name"))
        assert full.replace(" ", "") == "bert.encoder.layer.13.attention.self.query.lora_A.weight"
