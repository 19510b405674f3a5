"""The learning rate a PEFT method's tensors get: the what-if names it and the method's usual range, warning when a
live switch would keep full fine-tuning's rate; ``peft.lr`` sets it (BitFit's through the lr multipliers), from the
policy, the console's PEFT section, an export and a resume alike."""

from __future__ import annotations

import pytest

from spu_engine.core.policy import Change, Policy
from spu_engine.core.policy_files import parse_policy, policy_from_yaml
from support import record_run


def lora(**peft):
    return Change(set={"peft": {"method": "lora", "r": 2, **peft}})


def test_the_what_if_names_the_lr_and_warns_outside_the_usual_range(make_engine):
    engine = make_engine(lr=5e-5)
    notes = engine.preview(lora())["notes"]
    assert (
        "lora: its tensors train at lr 5e-05 (the run's lr; set peft.lr (the PEFT section's lr) for its own); "
        "lora's usual range is 0.0001 to 0.001. Warning: below it, little will learn; try 0.0002" in notes
    )
    assert (
        "lora: its tensors train at lr 0.0002 (peft.lr); lora's usual range is 0.0001 to 0.001"
        in (engine.preview(lora(lr=2e-4))["notes"])
    )
    ia3 = engine.preview(Change(set={"peft": {"method": "ia3", "lr": 0.05}}))["notes"]
    assert any(n.startswith("ia3: its tensors train at lr 0.05") and "above it" in n for n in ia3)


def test_peft_lr_reaches_the_added_tensors_and_survives_resume(make_engine, tmp_path):
    engine = make_engine(steps=6, lr=5e-5, run_dir=tmp_path / "a", checkpoint_every=3)
    engine.train_step()
    engine.apply_change(lora(lr=3e-4), "client")
    group = next(g for g in engine.optimizer.param_groups if g.get("name") == "peft:lora")
    assert group["base_lr"] == 3e-4
    engine.run()
    resumed = make_engine(steps=6, lr=5e-5, run_dir=tmp_path / "b")
    resumed.resume_from(tmp_path / "a" / "checkpoints" / "step-0000003")
    group = next(g for g in resumed.optimizer.param_groups if g.get("name") == "peft:lora")
    assert group["base_lr"] == 3e-4
    exported = policy_from_yaml(engine.replayable_policy().to_yaml())
    assert next(e for e in exported.timeline if e.set).set["peft"]["lr"] == 3e-4


def test_bitfit_takes_peft_lr_as_a_multiplier_of_what_it_trains(make_engine):
    engine = make_engine(lr=1e-4)
    engine.apply_change(Change(set={"peft": {"method": "bitfit", "lr": 5e-4}}), "test")
    engine.train_step()
    scales = {n: engine.runtime.lr_multipliers()[n] for n, p in engine.params.items() if p.requires_grad}
    assert scales and all(s == pytest.approx(5.0) for s in scales.values())
    trains = {id(p) for p in engine.params.values() if p.requires_grad}
    for g in engine.optimizer.param_groups:
        if any(id(p) in trains for p in g["params"]):
            assert g["lr_scale"] == pytest.approx(5.0)


def test_the_console_field_is_empty_for_the_run_s_lr():
    from spu_tui.widgets.control_fields import FIELD_BY_ID, section_values

    field = FIELD_BY_ID["peft-lr"]
    assert field.value_in(Policy()) == "" and field.unset == "run's lr"
    assert field.value_in(parse_policy({"peft": {"method": "lora", "lr": 2e-4}})) == "0.0002"
    typed = {"peft-method": "lora", "peft-lr": "2e-4"}
    assert section_values("peft", lambda f: typed.get(f.id, f.value_in(Policy())))["lr"] == 2e-4
    typed = {"peft-method": "lora"}
    assert "lr" not in section_values("peft", lambda f: typed.get(f.id, f.value_in(Policy())))  # empty: the run's
    typed = {"peft-method": "bitfit", "peft-lr": "5e-4"}
    assert section_values("peft", lambda f: typed.get(f.id, f.value_in(Policy())))["lr"] == 5e-4  # BitFit reads it
    assert "out of range" in field.problem("-1")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer):
    return record_run(tmp_path_factory, tokenizer, "peft-lr", [], steps=2, eval_every=0)


async def test_the_console_s_peft_section_sends_its_lr(plain_run):
    from spu_tui.app import SpuApp
    from support import ScriptedLink, type_into

    run_dir, history = plain_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:  # every panel at once
        await pilot.pause(0.3)
        app.query_one("#peft-method").value = "lora"
        await pilot.pause(0.2)
        await type_into(pilot, app, "peft-lr", "2e-4")
        cmd, fields = link.sent[-1]
        assert cmd == "preview" and fields["change"]["set"]["peft"]["lr"] == 2e-4
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert link.changes()[-1]["set"]["peft"]["lr"] == 2e-4 and link.changes()[-1]["set"]["peft"]["method"] == "lora"
