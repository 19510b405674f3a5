"""An adapter larger than the layer it adapts is said in the what-if and in the run's log, and refused where it could
not fit (LoRA r 100000 on a hidden size of 32 took 1.4 GB and 48 s to build)."""

from __future__ import annotations

import pytest

from spu_engine.core.policy import Change, PolicyError
from spu_engine.core.policy_files import parse_policy
from support import events_of

QUERY = "bert.encoder.layer.0.attention.self.query.weight"


def peft(**section):
    return Change(set={"peft": section})


def test_the_what_if_says_an_adapter_larger_than_its_layer(make_engine):
    engine = make_engine()
    notes = engine.preview(peft(method="lora", r=100000))["notes"]
    assert (
        f"refused: peft.r 100000: above 32, the larger side of {QUERY} (32x32), whose updates have rank 32 at most, "
        "so most of the rank could never be used. The adapters add 51,200,000 parameters: 195 MiB of weights, "
        "781 MiB with gradients and AdamW state; choose peft.r 32 or less (32: full rank)"
    ) in notes
    said = next(n for n in engine.preview(peft(method="lora", r=32))["notes"] if n.startswith("peft.r 32: "))
    assert f"8 of 8 adapted layers get an adapter larger than the layer itself ({QUERY} 32x32: 1,024 weights" in said
    assert "its adapter 2,048); from peft.r 32 an adapter is full rank" in said
    assert "The adapters add 16,384 parameters: 64.0 KiB of weights, 256 KiB with gradients and AdamW state" in said
    assert "peft.r 16 or less keeps each adapter no larger than its layer" in said
    assert not any("larger than" in n for n in engine.preview(peft(method="lora", r=16))["notes"])
    assert any(
        n.startswith("peft.init_r 20: ") for n in engine.preview(peft(method="adalora", init_r=20, target_r=8))["notes"]
    )
    adapter = engine.preview(peft(method="adapter", size=64))["notes"]
    assert any(n.startswith("peft.size 64: the bottleneck is no narrower than the hidden size 32") for n in adapter)


def test_the_run_says_it_at_start_and_refuses_what_could_not_be_used_or_fit(make_engine, tmp_path, monkeypatch):
    engine = make_engine(policy=parse_policy({"peft": {"method": "lora", "r": 32}}), run_dir=tmp_path / "run")
    engine.close()
    warnings = [e["message"] for e in events_of(tmp_path / "run", "log") if e.get("level") == "warning"]
    assert any(m.startswith("peft.r 32: 8 of 8 adapted layers get an adapter larger") for m in warnings), warnings
    with pytest.raises(PolicyError, match="peft.r 100000: above 32, the larger side of"):
        make_engine(policy=parse_policy({"peft": {"method": "lora", "r": 100000}}))
    from spu_engine.methods.peft import oversize

    monkeypatch.setattr(oversize, "free_bytes", lambda device: 100 * 2**10)
    with pytest.raises(PolicyError) as caught:
        make_engine(policy=parse_policy({"peft": {"method": "lora", "r": 32}}))
    assert (
        "peft.r 32: The adapters add 16,384 parameters: 64.0 KiB of weights, 256 KiB with gradients and AdamW state, "
        "and 100 KiB is free on "
    ) in str(caught.value)
    assert str(caught.value).endswith("they could not train; choose a smaller peft.r")
