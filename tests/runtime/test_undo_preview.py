"""Safe defaults said aloud: default pruning targets, what a change would do (preview), and undo."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, FreezeRule, PolicyError
from spu_engine.core.policy_files import parse_policy


def test_default_pruning_targets_leave_head_pooler_and_embeddings_dense(make_engine):
    engine = make_engine(
        "bert",
        parse_policy({"pruning": {"method": "magnitude", "schedule": {"kind": "constant", "final_sparsity": 0.5}}}),
    )
    engine.train_step()
    pm = next(m for m in engine.methods if m.section == "pruning")
    units = {engine.units.unit_of[n] for n in pm.targets}
    assert units == {f"block{i}" for i in range(engine.units.num_blocks)}
    assert not any("pooler" in n or "classifier" in n or "embeddings" in n or "LayerNorm" in n for n in pm.targets)
    for name, p in engine.params.items():
        if name not in pm.targets and p.dim() >= 2:  # classifier, pooler, embeddings
            assert (p != 0).float().mean() > 0.99, f"{name} was pruned but is no default target"
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-3)


def test_naming_the_head_prunes_it_and_says_so(make_engine):
    engine = make_engine("bert")
    logged = []
    engine.sinks.append(lambda _line, ev: logged.append(ev))
    change = Change(set={"pruning": {"method": "magnitude", "targets": ["*.weight"], "schedule": {"kind": "constant"}}})
    assert any("outside the blocks" in note for note in engine.preview(change)["notes"])  # said before ...
    engine.apply_change(change, "test")
    pm = next(m for m in engine.methods if m.section == "pruning")
    assert "classifier.weight" in pm.targets
    warnings = [ev["message"] for ev in logged if ev["type"] == "log" and ev["level"] == "warning"]
    assert any("outside the blocks" in w and "pooler.dense.weight" in w for w in warnings)  # ... and when applied


def test_weight_update_skipping_starts_full_and_the_preview_says_what_a_phase_trains(make_engine):
    engine = make_engine("bert")
    full = engine.preview(Change(set={"weight_update_skipping": {"enabled": True}}))
    assert full["trainable"] == engine.trainable_count()  # the default first phase trains everything, as in the paper
    assert "phase full trains every trainable tensor" in full["notes"][0]
    bias = engine.preview(Change(set={"weight_update_skipping": {"enabled": True, "start_phase": "bias_only"}}))
    biases = sum(p.numel() for n, p in engine.params.items() if n.endswith(".bias"))
    head = sum(p.numel() for n, p in engine.params.items() if n.startswith("classifier.") and not n.endswith(".bias"))
    assert bias["trainable"] == biases and head > 0  # biases only, nothing else
    assert "biases only" in bias["notes"][0]
    assert engine.trainable_count() == full["trainable"]  # a preview changes nothing


def test_preview_counts_a_peft_switch_before_it_happens(make_engine):
    engine = make_engine("bert")
    names = list(engine.param_names)
    preview = engine.preview(Change(set={"peft": {"method": "lora", "r": 2}}))
    assert engine.param_names == names  # nothing was added
    engine.apply_change(Change(set={"peft": {"method": "lora", "r": 2}}), "test")
    assert preview["trainable"] == engine.trainable_count()
    assert preview["total"] == sum(p.numel() for p in engine.params.values())


def test_preview_estimates_backward_from_the_frozen_prefix_and_selective_backprop(make_engine):
    engine = make_engine("bert")  # 4 blocks
    frozen = engine.preview(Change(freeze=[FreezeRule(units=["embeddings", "block0", "block1"], trainable=False)]))
    assert frozen["frozen_prefix_backward"] == 0.5 and frozen["backward"] == 0.5
    with_sb = engine.preview(
        Change(
            freeze=[FreezeRule(units=["embeddings", "block0", "block1"], trainable=False)],
            set={"selective_backprop": {"mode": "percentile", "keep": 0.5}},
        )
    )
    assert with_sb["backward"] == 0.25
    with pytest.raises(PolicyError, match="keep"):
        engine.preview(Change(set={"selective_backprop": {"keep": 2}}))


def test_undo_restores_the_sections_as_a_recorded_change(make_engine):
    engine = make_engine("bert")
    engine.apply_change(Change(freeze=[FreezeRule(units=["block0"], trainable=False)]), "client")
    engine.train_step()
    engine.apply_change(Change(set={"selective_backprop": {"mode": "percentile", "keep": 0.5}}), "client")
    engine.train_step()
    assert "selective_backprop" in engine.undo()
    assert engine.current.selective_backprop.mode == "off" and len(engine.current.freeze) == 1
    assert "freeze" in engine.undo()
    assert engine.current.freeze == [] and all(p.requires_grad for p in engine.params.values())
    with pytest.raises(PolicyError, match="nothing to undo"):
        engine.undo()
    assert [list(e.set) for e in engine.recorded] == [[], ["selective_backprop"], ["selective_backprop"], ["freeze"]]
    replayed = engine.replayable_policy().at_step(engine.step)
    assert replayed.freeze == [] and replayed.selective_backprop.mode == "off"


def test_undo_of_trained_lora_is_refused_and_changes_nothing(make_engine):
    engine = make_engine("bert")
    engine.apply_change(Change(set={"peft": {"method": "lora", "r": 2}}), "client")
    engine.train_step()
    names = list(engine.param_names)
    with pytest.raises(PolicyError, match="peft.method: cannot change 'lora' to 'none'"):
        engine.undo()
    assert engine.param_names == names and engine.current.peft.method == "lora"
    assert len(engine.undoable) == 1  # still there to undo once it can be


def test_a_refused_peft_switch_leaves_the_installed_method_whole(make_engine):
    """LoRA has trained, (IA)³ is asked for: refused before (IA)³ adds anything, and LoRA keeps working."""
    engine = make_engine("bert")
    engine.apply_change(Change(set={"peft": {"method": "lora", "r": 2}}), "client")
    engine.train_step()
    names = list(engine.param_names)
    with pytest.raises(PolicyError, match="cannot change 'lora' to 'ia3'"):
        engine.apply_change(Change(set={"peft": {"method": "ia3"}}), "client")
    assert engine.param_names == names and not any("ia3" in n for n in names)
    for _ in range(2):
        engine.train_step()


def test_an_untrained_peft_switch_replaces_the_tensors(make_engine):
    engine = make_engine("gpt2")
    engine.apply_change(Change(set={"peft": {"method": "lora", "r": 2}}), "client")
    engine.apply_change(Change(set={"peft": {"method": "ia3"}}), "client")  # same boundary: LoRA never trained
    assert any(n.endswith(".ia3_l") for n in engine.param_names) and not any(".lora_" in n for n in engine.param_names)
    engine.train_step()


def test_nothing_trainable_is_said_and_steps_still_run(make_engine):
    """Bias-only skipping with LoRA on GPT-2 (its head has no bias): no parameter trains; the run goes on, changing nothing."""
    engine = make_engine("gpt2")
    change = Change(
        set={
            "weight_update_skipping": {"enabled": True, "start_phase": "bias_only"},
            "peft": {"method": "lora", "r": 2},
        }
    )
    assert any("nothing would train" in note for note in engine.preview(change)["notes"])
    logged = []
    engine.sinks.append(lambda _line, ev: logged.append(ev))
    engine.apply_change(change, "client")
    assert engine.trainable_count() == 0
    assert any(ev["type"] == "log" and "no parameter trains now" in ev["message"] for ev in logged)
    before = {n: p.detach().clone() for n, p in engine.params.items()}
    engine.train_step()
    assert all(torch.equal(p, before[n]) for n, p in engine.params.items())
