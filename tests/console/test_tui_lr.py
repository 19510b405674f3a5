"""The console's learning-rate controls (layer decay, warm-in, typed multiplier rules) and AdaLoRA's ranks in the unit tree."""

from __future__ import annotations

import pytest

from spu_engine.core.policy_files import parse_policy
from spu_engine.core.runs import read_history
from spu_tui.app import SpuApp
from support import ScriptedLink, small_sst2

POLICY = {
    "peft": {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2},
    "lr": {"decay": 0.9, "scale": [{"units": ["head"], "scale": 2}]},
}


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory, tokenizer):
    """A finished 8-step tiny-BERT AdaLoRA run with layer-wise decay and one multiplier rule."""
    from spu_engine.loop.engine import Engine, EngineConfig
    from spu_engine.tasks import TaskOptions
    from spu_engine.tasks.classification import ClassificationTask
    from support import build_tiny

    run_dir = tmp_path_factory.mktemp("adalora")
    data = small_sst2(tmp_path_factory.mktemp("sst2"))
    task = ClassificationTask.build(
        str(data), tokenizer, TaskOptions(max_length=32, max_train_samples=64, max_eval_samples=16)
    )
    config = EngineConfig(
        model="tiny", data=str(data), steps=8, batch_size=8, lr=1e-2, warmup=0, eval_every=0, stats_every=1
    )
    engine = Engine(
        config, parse_policy(POLICY), run_dir, model=build_tiny("bert", tokenizer), tokenizer=tokenizer, task=task
    )
    engine.run()
    engine.close()
    return run_dir, read_history(run_dir)


def rules(app) -> list[str]:
    return [str(item.query_one("Static").render()) for item in app.query_one("#lr-rules").children]


async def test_ranks_show_on_the_adalora_rows(adalora_run):
    run_dir, history = adalora_run
    ranks = [e for e in history if e["type"] == "ranks"][-1]["ranks"]
    app = SpuApp(run_dir, history=history, link=ScriptedLink())
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        tree = app.query_one("UnitTree")
        module = next(iter(ranks))
        label = str(tree._row_nodes[next(r for r in tree._row_nodes if r.name == f"{module}.lora_E")].label)
        assert f"lora_E r{ranks[module]}" in label
        assert any(
            line.text.startswith(f"adalora ranks: budget {2 * len(ranks)} over {len(ranks)} modules")
            for line in app.state.log
        )


async def test_lr_rules_are_listed_typed_previewed_added_and_removed(adalora_run):
    run_dir, history = adalora_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        assert rules(app) == ["0: x2 head"]
        assert app.query_one("#lr-decay").value == "0.9"

        field = app.query_one("#lr-rule-new")
        field.focus()
        field.value = "layers: 0-1, scale: -2"
        await pilot.pause(0.1)
        status = app.query_one("#status-lr")
        assert "lr rule: scale: Input should be greater than 0 (got -2)" in str(status.render())
        await pilot.press("enter")
        assert [cmd for cmd, _ in link.sent] == []  # refused here: nothing is sent, not even a preview

        field.value = "layers: 0-1, scale: 0.5"
        await pilot.pause(0.1)
        wanted = {"lr": {"scale": [{"units": ["head"], "scale": 2.0}, {"layers": [0, 1], "scale": 0.5}]}}
        assert link.sent[-1][0] == "preview" and link.sent[-1][1]["change"]["set"] == wanted
        await pilot.press("enter")
        assert link.changes()[-1]["set"] == wanted

        view = app.query_one("#lr-rules")
        view.focus()
        view.index = 0
        await pilot.press("x")
        assert link.changes()[-1]["set"] == {"lr": {"scale": []}}

        decay = app.query_one("#lr-decay")
        decay.focus()
        decay.value = "1.5"
        await pilot.pause(0.1)
        assert "decay: 1.5 is out of range; allowed 0.0 < decay <= 1.0" in str(status.render())
        decay.value = "0.8"
        await pilot.press("enter")
        assert link.changes()[-1]["set"]["lr"] == {"decay": 0.8, "warm_in": 0}


async def test_the_peft_form_shows_only_the_fields_its_method_reads(adalora_run):
    """AdaLoRA's ranks and schedule show for AdaLoRA; switching the method to LoRA hides them and shows its rank;
    adapters show their size alone (issue 27: a form of every method's fields misleads)."""
    run_dir, history = adalora_run
    app = SpuApp(run_dir, history=history, link=ScriptedLink())
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)

        def shown(*ids: str) -> list[bool]:
            return [app.query_one(f"#{i}").display and app.query_one(f"#label-{i}").display for i in ids]

        assert shown("peft-init-r", "peft-target-r", "peft-r", "peft-size") == [True, True, False, False]
        app.query_one("#peft-method").value = "lora"
        await pilot.pause(0.2)
        assert shown("peft-init-r", "peft-target-r", "peft-r", "peft-size") == [False, False, True, False]
        app.query_one("#peft-method").value = "adapter"
        await pilot.pause(0.2)
        assert shown("peft-r", "peft-size", "peft-method") == [False, True, True]
