"""peft's LoRA variants (DoRA, rsLoRA, PiSSA, LoRA+, per-module ranks) and AdaLoRA: they train, export merged, and say their ranks."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from spu_engine.core.policy import Change, Policy, PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.methods.peft.adalora import AdaLoRA
from spu_engine.tools.export import export_run, probe_batch
from support import SST2


def run_config(model_dir, steps: int = 6) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        data=str(SST2),
        task="classification",
        steps=steps,
        batch_size=4,
        max_length=32,
        max_train_samples=64,
        max_eval_samples=16,
        eval_every=0,
        warmup=0,
        lr=5e-3,
        stats_every=1,
    )


def lora_tensors(engine: Engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.params.items() if ".lora_" in n}


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}, {"init": "pissa"}, {"lr_ratio": 16.0}])
def test_lora_variant_exports_a_peft_folder_and_merged_weights_equal_to_the_adapted_model(
    variant, tiny_model_dir, tmp_path
):
    run_dir = tmp_path / "run"
    engine = Engine(run_config(tiny_model_dir), parse_policy({"peft": {"method": "lora", "r": 4, **variant}}), run_dir)
    start = lora_tensors(engine)
    assert start, "the variant added LoRA tensors"
    engine.run()
    moved = [n for n, t in lora_tensors(engine).items() if not torch.equal(t, start[n])]
    assert moved, f"no LoRA tensor moved with {variant}"
    engine.model.eval()
    batch = probe_batch(engine.model.config, batch_size=4, length=24)
    with torch.no_grad():
        adapted = engine.model(**batch).logits
    engine.close()
    report = export_run(run_dir, tmp_path / "out", merge=True)
    assert report.merged_diff is not None and report.merged_diff < 1e-4
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, adapted, atol=1e-4)
    folder = export_run(run_dir, tmp_path / "peft")  # the default: a peft folder onto the unchanged base model
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"]) == (
        variant.get("use_dora", False),
        variant.get("use_rslora", False),
    )
    if variant.get("init") == "pissa":  # the residual left in the base weight travels as extra rank
        assert set(config["rank_pattern"].values()) == {8} and config["init_lora_weights"] is True
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert torch.allclose(
            PeftModel.from_pretrained(base, tmp_path / "peft").eval()(**batch).logits, adapted, atol=1e-4
        )
    assert folder.loaded_diff < 1e-4


def test_pissa_moves_the_top_singular_part_out_of_the_base_weight(make_engine):
    plain = make_engine()
    engine = make_engine(policy=parse_policy({"peft": {"method": "lora", "r": 4, "init": "pissa"}}))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(engine.params[name], plain.params[name])  # the residual W - B A
    b = engine.params["bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert b.abs().sum() > 0  # not the zero start of plain LoRA


def test_lora_plus_puts_b_in_its_own_group_at_ratio_times_a(make_engine):
    engine = make_engine(policy=parse_policy({"peft": {"method": "lora", "r": 4, "lr": 1e-3, "lr_ratio": 16}}))
    engine.train_step()
    by_name = {id(p): n for n, p in engine.params.items()}
    groups = [g for g in engine.optimizer.param_groups if g["name"] == "peft:lora"]
    b_group = next(g for g in groups if g["lr_scale"] == 16.0)
    a_group = next(g for g in groups if g["lr_scale"] == 1.0)
    assert all(".lora_B." in by_name[id(p)] for p in b_group["params"])
    assert all(".lora_A." in by_name[id(p)] for p in a_group["params"])
    assert b_group["lr"] == pytest.approx(16 * a_group["lr"]) and a_group["lr"] == pytest.approx(1e-3)
    engine.apply_change(
        Change(set={"peft": {"lr_ratio": 4}}), source="client"
    )  # live: only the groups' multipliers move
    state_before = {id(p): engine.optimizer.state[p]["exp_avg"].clone() for p in b_group["params"]}
    b_group = next(g for g in engine.optimizer.param_groups if g["name"] == "peft:lora" and g["lr_scale"] == 4.0)
    assert all(torch.equal(engine.optimizer.state[p]["exp_avg"], state_before[id(p)]) for p in b_group["params"])


def test_rank_pattern_sets_one_modules_rank(make_engine):
    engine = make_engine(
        policy=parse_policy({"peft": {"method": "lora", "r": 4, "rank_pattern": {"layer.0.attention.self.query": 2}}})
    )
    assert engine.params["bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape[0] == 2
    assert engine.params["bert.encoder.layer.1.attention.self.query.lora_A.weight"].shape[0] == 4


def test_adalora_cuts_ranks_reports_them_and_exports_merged(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    peft = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3}
    engine = Engine(run_config(tiny_model_dir, steps=10), parse_policy({"peft": peft}), run_dir)
    ranks: list[dict] = []
    engine.sinks.append(lambda line, ev: ranks.append(ev) if ev["type"] == "ranks" else None)
    engine.run()
    assert ranks, "no ranks event"
    final = ranks[-1]["ranks"]
    assert min(final.values()) < 4 and ranks[-1]["budget"] == 2 * len(final)  # the budget is target_r per matrix
    method = next(m for m in engine.methods if isinstance(m, AdaLoRA))
    assert method.ranks() == final
    engine.model.eval()
    batch = probe_batch(engine.model.config, batch_size=4, length=24)
    with torch.no_grad():
        adapted = engine.model(**batch).logits
    engine.close()
    report = export_run(run_dir, tmp_path / "out", merge=True)
    assert report.merged_diff < 1e-4
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, adapted, atol=1e-4)
    resumed = Engine(run_config(tiny_model_dir, steps=10), None, run_dir)  # ranks and the allocator's averages survive
    resumed.resume_from(report.checkpoint)
    again = next(m for m in resumed.methods if isinstance(m, AdaLoRA))
    assert again.ranks() == final
    assert set(again.tensor_state()) == set(method.tensor_state())
    resumed.close()


def test_a_variant_cannot_change_once_lora_has_trained(make_engine):
    engine = make_engine(policy=parse_policy({"peft": {"method": "lora", "r": 4}}))
    engine.apply_change(Change(set={"peft": {"use_dora": True}}), source="client")  # nothing trained yet: put in again
    assert any("lora_magnitude_vector" in n for n in engine.params)
    engine.train_step()
    with pytest.raises(PolicyError, match="peft.use_dora: cannot change True to False in a running model"):
        engine.apply_change(Change(set={"peft": {"use_dora": False}}), source="client")


@pytest.mark.parametrize(
    "peft, message",
    [
        ({"method": "adalora", "init_r": 2, "target_r": 4}, "target_r (4) must be <= init_r (2)"),
        ({"method": "adalora", "use_dora": True}, "use_dora: only with method lora"),
        ({"method": "adalora", "tinit": 5, "tfinal": 5, "total_step": 10}, "tinit (5) must be < total_step - tfinal"),
        ({"method": "lora", "lr_ratio": 0}, "peft.lr_ratio"),
        ({"method": "lora", "init": "svd"}, "peft.init"),
        ({"method": "lora", "rank_pattern": {"query": 0}}, "'query': 0 must be > 0"),
    ],
)
def test_bad_variant_settings_are_refused_naming_the_key(peft, message):
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_policy({"peft": peft})


def test_adalora_schedule_that_leaves_no_budgeting_phase_is_refused_at_the_run_length(make_engine):
    with pytest.raises(PolicyError, match="peft.tinit"):
        make_engine(
            policy=Policy.model_validate({"peft": {"method": "adalora", "tinit": 15, "tfinal": 5}})
        )  # run of 20 steps
