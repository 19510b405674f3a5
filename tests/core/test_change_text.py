"""What a change's log line names: only the fields that apply to the method it picks."""

from __future__ import annotations

from spu_engine.core.run_metrics import describe_change
from spu_engine.methods.peft import SECTION
from spu_engine.methods.peft.settings import Peft


def console_peft_change(method: str) -> dict:
    """The peft change the console sends: every field its PEFT section shows, whatever the method."""
    defaults = Peft().model_dump(mode="json")
    return {"set": {"peft": {f.path: defaults[f.path] for f in SECTION.fields} | {"method": method}}}


def test_a_lora_change_names_lora_s_fields_not_adalora_s():
    text = describe_change(console_peft_change("lora"))
    assert text.startswith("peft: method=lora, r=8, alpha=16.0")
    for field in ("init_r", "target_r", "size"):
        assert f"{field}=" not in text, text


def test_an_adalora_change_names_its_ranks_and_an_adapter_change_its_size():
    adalora = describe_change(console_peft_change("adalora"))
    assert "init_r=12" in adalora and "target_r=8" in adalora and "use_dora" not in adalora and " r=" not in adalora
    assert describe_change(console_peft_change("adapter")) == "peft: method=adapter, size=64"


def test_a_change_without_a_method_names_every_field_it_sets():
    assert describe_change({"set": {"peft": {"r": 4, "init_r": 6}}}) == "peft: r=4, init_r=6"
