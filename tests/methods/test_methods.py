"""BitFit, Houlsby adapters, IA3 and LoRA on tiny models: the right tensors train, every other stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.methods.peft.adapter import SLOTS
from spu_engine.methods.targets import is_bias, norm_names, task_head_names
from spu_engine.model.houlsby import BottleneckAdapter
from support import build_tiny


def snapshot(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.params.items()}


def changed_after(engine, steps: int = 3) -> tuple[set[str], dict[str, torch.Tensor]]:
    """Train ``steps`` steps; names whose tensor changed (or that are new), and the snapshot taken before."""
    before = snapshot(engine)
    for _ in range(steps):
        engine.train_step()
    after = dict(engine.params)
    changed = {n for n, p in after.items() if n not in before or not torch.equal(p, before[n])}
    return changed, before


def assert_others_identical(engine, before, allowed: set[str]) -> None:
    after = dict(engine.params)
    for n, old in before.items():
        if n not in allowed:
            assert torch.equal(after[n], old), f"{n} changed but should not train"


def peft(method: str, **settings):
    return parse_policy({"peft": {"method": method, **settings}})


def test_bitfit_trains_biases_and_head_only(make_engine):
    engine = make_engine("bert", peft("bitfit"))
    head = task_head_names(engine.model)
    assert head == {"classifier.weight", "classifier.bias"}
    expected = {n for n in engine.param_names if is_bias(n) or n in head}
    assert {n for n, p in engine.model.named_parameters() if p.requires_grad} == expected
    changed, before = changed_after(engine)
    assert changed == expected
    assert_others_identical(engine, before, expected)


def test_bitfit_is_anded_with_freeze_rules(make_engine):
    policy = parse_policy({"peft": {"method": "bitfit"}, "freeze": [{"layers": [0, 1], "trainable": False}]})
    engine = make_engine("bert", policy)
    trainable = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert trainable and all(is_bias(n) or n.startswith("classifier") for n in trainable)
    assert not any(".layer.0." in n or ".layer.1." in n for n in trainable)


def test_adapter_trainable_count_is_2md_plus_d_plus_m(make_engine):
    m = 8
    engine = make_engine("bert", peft("adapter", size=m))
    d = engine.model.config.hidden_size
    adapters = [mod for mod in engine.model.modules() if isinstance(mod, BottleneckAdapter)]
    blocks = engine.units.num_blocks
    assert len(adapters) == 2 * blocks  # after attention and after the feed-forward sublayer of every block
    for a in adapters:
        assert sum(p.numel() for p in a.parameters()) == 2 * m * d + d + m
    norms, head = norm_names(engine.model), task_head_names(engine.model)
    adapter_params = sum(p.numel() for a in adapters for p in a.parameters())
    others = sum(p.numel() for n, p in engine.model.named_parameters() if n in norms or n in head)
    assert engine.trainable_count() == adapter_params + others


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "gpt2"])
def test_adapters_sit_on_the_forward_path_of_every_block(make_engine, tokenizer, arch):
    engine = make_engine(arch, peft("adapter", size=4))
    model = engine.model.eval()
    for i in range(engine.units.num_blocks):
        names = [
            n
            for n in engine.param_names
            if engine.units.unit_of[n] == f"block{i}" and any(f".{s}." in n for s in SLOTS)
        ]
        assert len(names) == 8, names  # two adapters (down/up weight+bias each) land in the block's own unit
    batch = engine.next_batch(4)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = (
        build_tiny(arch, tokenizer).eval().to(engine.device)
    )  # same seed: the weights the engine's model started from
    adapters = [mod for mod in model.modules() if isinstance(mod, BottleneckAdapter)]
    calls = []
    hooks = [a.register_forward_hook(lambda *_: calls.append(1)) for a in adapters]
    with torch.no_grad():
        for a in adapters:
            a.up.weight.zero_()
            a.up.bias.zero_()
        assert torch.equal(model(**inputs).logits, plain(**inputs).logits)  # a zero up-projection is the identity
        assert len(calls) == len(adapters)  # each adapter ran exactly once
        adapters[0].up.bias.normal_()  # a per-feature shift (a constant one would vanish in the layer norm)
        assert not torch.allclose(model(**inputs).logits, plain(**inputs).logits)
    for h in hooks:
        h.remove()


def test_adapter_init_is_near_identity(make_engine):
    engine = make_engine("bert", peft("adapter", size=16))
    for a in (mod for mod in engine.model.modules() if isinstance(mod, BottleneckAdapter)):
        for layer in (a.down, a.up):
            assert layer.weight.abs().max() <= 2e-2 and layer.weight.std() <= 1e-2
            assert torch.count_nonzero(layer.bias) == 0


def test_adapter_trains_adapters_norms_and_head_only(make_engine):
    engine = make_engine("bert", peft("adapter", size=4, lr=1e-2))
    expected = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert any(".attn_adapter." in n for n in expected) and "classifier.weight" in expected
    assert not any(n.endswith("query.weight") or "word_embeddings" in n for n in expected)
    changed, before = changed_after(engine)
    assert changed == expected
    assert_others_identical(engine, before, expected)
    group = next(g for g in engine.optimizer.param_groups if g["name"] == "peft:adapter")
    assert group["base_lr"] == 1e-2 and group["weight_decay"] == 0.0


@pytest.mark.parametrize("method, marker", [("lora", ".lora_"), ("ia3", ".ia3_l")])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_peft_tuner_trains_its_tensors_and_head_only(make_engine, arch, method, marker):
    engine = make_engine(arch, peft(method, r=2))
    head = task_head_names(engine.model)
    expected = {n for n in engine.param_names if marker in n} | head
    assert {n for n, p in engine.params.items() if p.requires_grad} == expected
    assert all(engine.units.unit_of[n].startswith("block") for n in expected - head)
    changed, before = changed_after(engine)
    assert changed == expected
    assert_others_identical(engine, before, expected)


def test_ia3_rescales_keys_values_and_feed_forward_only(make_engine):
    engine = make_engine("bert", peft("ia3"))
    block0 = sorted(n.split("layer.0.")[1] for n in engine.param_names if n.endswith(".ia3_l") and "layer.0." in n)
    assert block0 == [
        "attention.self.key.ia3_l",
        "attention.self.value.ia3_l",
        "output.dense.ia3_l",
    ]  # stable names of peft's ia3_l.default
    ff = engine.params["bert.encoder.layer.0.output.dense.ia3_l"]
    assert ff.shape[-1] == engine.model.config.intermediate_size  # the feed-forward activation is rescaled
    assert torch.equal(ff, torch.ones_like(ff))


def test_unknown_target_module_is_a_clear_error(make_engine):
    with pytest.raises(PolicyError, match="peft.target_modules"):
        make_engine("bert", peft("lora", target_modules=["no_such_proj"]))


def test_names_stay_as_loaded_under_lora_and_rules_select_the_same_tensors(make_engine):
    """peft renames query.weight to query.base_layer.weight; the engine, its rules and its events never see that."""
    before = make_engine("bert").param_names
    policy = parse_policy(
        {
            "peft": {"method": "lora", "r": 2},
            "freeze": [
                {"match": "*.attention.self.query.weight", "trainable": False},
                {"match": "*.layer.0.*.lora_*", "trainable": False},
            ],
        }
    )
    engine = make_engine("bert", policy)
    assert [n for n in engine.param_names if ".lora_" not in n] == before
    assert not any("base_layer" in n or ".default" in n for n in engine.param_names)
    assert engine.params["bert.encoder.layer.0.attention.self.query.weight"] is engine.model.get_parameter(
        "bert.encoder.layer.0.attention.self.query.base_layer.weight"
    )
    lora = [n for n in engine.param_names if ".lora_" in n]
    assert "bert.encoder.layer.1.attention.self.query.lora_A.weight" in lora
    assert all(engine.params[n].requires_grad == (".layer.0." not in n) for n in lora)
    described = {p["name"] for u in engine.hello()["units"] for p in u["params"]}
    assert described == set(engine.param_names)


def test_add_adapters_to_a_running_engine(make_engine):
    engine = make_engine("bert")
    engine.train_step()
    engine.train_step()
    groups = len(engine.optimizer.param_groups)
    engine.apply_change(Change(set={"peft": {"method": "adapter", "size": 4}}), source="client")
    assert len(engine.optimizer.param_groups) == groups + 1
    assert any(".ffn_adapter." in p["name"] for u in engine.hello()["units"] for p in u["params"])
    expected = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert any("adapter" in n for n in expected) and not any(n.endswith("query.weight") for n in expected)
    changed, _before = changed_after(engine, 2)
    assert changed == expected
    assert engine.replayable_policy().timeline[-1].set == {"peft": {"method": "adapter", "size": 4}}
    with pytest.raises(PolicyError, match="peft.method: cannot change 'adapter' to 'none'.*have trained"):
        engine.apply_change(Change(set={"peft": {"method": "none"}}), source="client")
    with pytest.raises(PolicyError, match="peft.size: cannot change 4 to 8"):
        engine.apply_change(Change(set={"peft": {"size": 8}}), source="client")
    assert engine.current.peft.method == "adapter" and engine.current.peft.size == 4


def test_a_refused_change_undoes_tensors_added_at_the_same_boundary(make_engine):
    engine = make_engine("bert")
    engine.train_step()
    names, groups = list(engine.param_names), len(engine.optimizer.param_groups)
    bad = Change(set={"peft": {"method": "lora"}, "weight_update_skipping": {"enabled": True, "last_k_blocks": 99}})
    with pytest.raises(PolicyError, match="last_k_blocks: 99"):
        engine.apply_change(bad, source="client")
    assert engine.param_names == names and len(engine.optimizer.param_groups) == groups
    assert not hasattr(engine.model, "peft_config")
    changed, _ = changed_after(engine, 1)
    assert "bert.encoder.layer.0.attention.self.query.weight" in changed  # the original tensors train again


def test_bitfit_can_be_switched_on_and_off_live(make_engine):
    engine = make_engine("bert")
    engine.apply_change(Change(set={"peft": {"method": "bitfit"}}), source="client")
    assert all(is_bias(n) or n.startswith("classifier") for n, p in engine.model.named_parameters() if p.requires_grad)
    engine.train_step()
    engine.apply_change(Change(set={"peft": {"method": "none"}}), source="client")
    assert engine.trainable_count() == sum(p.numel() for p in engine.model.parameters())
