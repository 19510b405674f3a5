"""Pruning on tiny models: masks, schedules, IMP reset/rewind, movement scores, live changes, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.utils import prune

from spu_engine.core.policy import Change, PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.methods.pruning.layout import sublayer
from spu_engine.methods.pruning.masks import MaskedWeights
from support import build_tiny, method_of, pruning_policy, run_steps


def pruned_counts(engine):
    pm = method_of(engine)
    return {n: pm.masks.pruned(n) for n in pm.targets}


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("scope", ["global", "per_unit", "per_layer"])
def test_magnitude_masks_equal_torch_prune(make_engine, scope):
    engine = make_engine(policy=pruning_policy(scope=scope, schedule={"kind": "constant", "final_sparsity": 0.6}))
    pm = method_of(engine)
    reference = copy.deepcopy(engine.model)
    engine.train_step()  # before_step(0) prunes to 0.6 at once (constant schedule)
    modules = [(reference.get_submodule(n.rsplit(".", 1)[0]), "weight") for n in pm.targets]
    if scope == "global":
        prune.global_unstructured(modules, pruning_method=prune.L1Unstructured, amount=0.6)
    elif scope == "per_unit":  # one global ranking inside each unit (block)
        for unit in {engine.units.unit_of[n] for n in pm.targets}:
            prune.global_unstructured(
                [m for m, n in zip(modules, pm.targets) if engine.units.unit_of[n] == unit],
                pruning_method=prune.L1Unstructured,
                amount=0.6,
            )
    else:
        for module, attr in modules:
            prune.l1_unstructured(module, attr, amount=0.6)
    for n, (module, _) in zip(pm.targets, modules):
        assert torch.equal(pm.masks.keep(n), module.weight_mask.bool()), n


def test_parameter_names_units_and_state_dict_stay_plain(make_engine):
    engine = make_engine(policy=pruning_policy("movement"))
    names = [n for n, _ in engine.model.named_parameters()]
    units = engine.units.describe()
    run_steps(engine, 5)
    assert [n for n, _ in engine.model.named_parameters()] == names  # no weight_orig, no parametrizations, no scores
    assert engine.units.describe() == units
    pm = method_of(engine)
    state = engine.model.state_dict()
    for n in pm.targets:
        keep = pm.masks.keep(n)
        assert (state[n][~keep] == 0).all() and n in state
        assert (pm.masks.dense(n)[~keep] != 0).any(), "latent values are kept aside for regrowth"


@pytest.mark.parametrize(
    "method, scope",
    [
        ("magnitude", "global"),
        ("magnitude", "per_layer"),
        ("magnitude", "per_unit"),
        ("movement", "global"),
        ("soft_movement", "per_layer"),
        ("soft_movement", "per_unit"),
        ("imp", "global"),
    ],
)
def test_sparsity_at_end_of_schedule_equals_target(make_engine, method, scope):
    engine = make_engine(policy=pruning_policy(method, scope=scope), steps=5, batch_size=4)
    run_steps(engine, 5)
    pm = method_of(engine)
    counts = pruned_counts(engine)
    sizes = {n: engine.params[n].numel() for n in pm.targets}
    target = 0.7 if method != "imp" else 1 - 0.7**2
    if scope == "per_layer":
        for n in pm.targets:
            assert abs(counts[n] - target * sizes[n]) <= 1, n
    elif scope == "per_unit":
        for unit in {engine.units.unit_of[n] for n in pm.targets}:
            names = [n for n in pm.targets if engine.units.unit_of[n] == unit]
            assert abs(sum(counts[n] for n in names) - target * sum(sizes[n] for n in names)) <= 1, unit
    else:
        assert abs(sum(counts.values()) - target * sum(sizes.values())) <= len(sizes)
    ev = pm.stats(engine.step)["pruning"]
    assert ev["method"] == method and ev["sparsity"] == pytest.approx(target, abs=1e-3)


def test_cubic_schedule_values(make_engine):
    schedule = {"start_step": 1, "end_step": 7, "every": 2, "initial_sparsity": 0.1, "final_sparsity": 0.5}
    engine = make_engine(policy=pruning_policy(schedule=schedule), batch_size=4)
    pm = method_of(engine)
    seen = {}
    for _ in range(8):
        engine.train_step()
        seen[engine.step - 1] = pm.sparsity()
    assert seen[0] == 0.0
    for t in (1, 3, 5, 7):
        want = 0.5 + (0.1 - 0.5) * (1 - (t - 1) / 6) ** 3
        assert seen[t] == pytest.approx(want, abs=1e-3), t
        if t < 7:
            assert seen[t + 1] == seen[t]  # masks change only every `every` steps


def test_masked_weights_stay_zero_through_optimizer_steps(make_engine):
    engine = make_engine(policy=pruning_policy(schedule={"kind": "constant", "final_sparsity": 0.5}), weight_decay=0.1)
    pm = method_of(engine)
    engine.train_step()
    keeps = {n: pm.masks.keep(n).clone() for n in pm.targets}
    for _ in range(3):
        engine.train_step()
        for n, keep in keeps.items():
            p = engine.params[n]
            # Adam's momentum would move pruned entries (the danger is real) ...
            assert (engine.optimizer.state[p]["exp_avg"][~keep] != 0).any(), n
            # ... but after every optimizer step they are zero again
            assert (p[~keep] == 0).all() and (p[keep] != 0).all(), n
    state = engine.model.state_dict()
    for n, keep in keeps.items():
        assert torch.equal(pm.masks.keep(n), keep)
        assert (state[n][~keep] == 0).all()
        assert (pm.masks.dense(n)[~keep] != 0).any()  # the latent values are still there


def test_units_event_reports_mask_sparsity_and_sublayer_layout(make_engine):
    engine = make_engine(policy=pruning_policy(scope="per_layer", schedule={"kind": "constant", "final_sparsity": 0.5}))
    events = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    run_steps(engine, 2)
    units = [e for e in events if e["type"] == "units"][-1]
    assert units["tensors"]["bert.encoder.layer.0.attention.self.query.weight"]["sparsity"] == pytest.approx(
        0.5, abs=1e-3
    )
    assert units["tensors"]["bert.encoder.layer.0.attention.self.query.bias"]["sparsity"] == 0.0
    assert units["units"]["block0"]["sparsity"] > 0.4
    layout = [e for e in events if e["type"] == "step"][-1]["pruning"]["layout"]
    assert set(layout) == {"block0", "block1", "block2", "block3"}
    assert set(layout["block2"]) == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    assert all(v == pytest.approx(0.5, abs=1e-3) for v in layout["block2"].values())


def test_sublayer_names_across_architectures():
    assert sublayer("bert.encoder.layer.0.attention.self.value.weight") == "v"
    assert sublayer("bert.encoder.layer.0.attention.output.dense.weight") == "o"
    assert sublayer("bert.encoder.layer.0.output.dense.weight") == "ffn_out"
    assert sublayer("distilbert.transformer.layer.1.ffn.lin1.weight") == "ffn_in"
    assert sublayer("transformer.h.0.attn.c_attn.weight") == "qkv"
    assert sublayer("transformer.h.0.attn.c_proj.weight") == "o"
    assert sublayer("transformer.h.0.mlp.c_proj.weight") == "ffn_out"
    assert sublayer("model.layers.0.self_attn.k_proj.weight") == "k"
    assert sublayer("model.layers.0.mlp.down_proj.weight") == "ffn_out"
    assert sublayer("classifier.weight") == "other"


# --------------------------------------------------------------------------- IMP


def test_imp_reset_restores_pretrained_values(make_engine):
    engine = make_engine(policy=pruning_policy("imp", imp={"rounds": 1, "round_steps": 3, "reset": "pretrained"}))
    pretrained = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    events = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    run_steps(engine, 3)
    assert any(not torch.equal(p, pretrained[n]) for n, p in engine.model.named_parameters())
    method_of(engine).before_step(3)  # round 1 is due at step 3
    pm = method_of(engine)
    for n, p in engine.model.named_parameters():
        dense = pm.masks.dense(n) if n in pm.masks.masks else p.detach()
        assert torch.equal(dense, pretrained[n]), (
            n
        )  # survivors, pruned latent values and everything else back to step 0
    for n in pm.targets:
        assert (engine.params[n][~pm.masks.keep(n)] == 0).all()
    assert pm.sparsity() == pytest.approx(0.3, abs=1e-4)
    rounds = [e for e in events if e["type"] == "prune"]
    assert rounds and rounds[0]["round"] == 1 and rounds[0]["step"] == 3
    assert not engine.optimizer.state.get(engine.params[pm.targets[0]])  # fresh optimizer state


def test_imp_rewind_restores_early_checkpoint(make_engine):
    engine = make_engine(
        policy=pruning_policy("imp", imp={"rounds": 2, "round_steps": 3, "reset": "rewind", "rewind_step": 1})
    )
    engine.train_step()
    at_step_1 = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    run_steps(engine, 2)
    pm = method_of(engine)
    pm.before_step(3)
    for n, p in engine.model.named_parameters():
        assert torch.equal(pm.masks.dense(n) if n in pm.masks.masks else p.detach(), at_step_1[n]), n
    run_steps(engine, 4)  # round 2 at step 6 (its before_step runs inside train_step)
    assert pm.pruner.rounds_done == 2 and pm.sparsity() == pytest.approx(1 - 0.7**2, abs=1e-4)


def test_imp_rewind_step_in_the_past_is_refused(make_engine):
    engine = make_engine()
    run_steps(engine, 3)
    with pytest.raises(PolicyError, match="rewind_step: step 1 has passed"):
        engine.apply_change(
            Change(
                set={"pruning": pruning_policy("imp", imp={"reset": "rewind", "rewind_step": 1}).pruning.model_dump()}
            ),
            "test",
        )
    assert not method_of(engine).active


# --------------------------------------------------------------------------- movement


def test_movement_scores_fall_for_weights_moving_toward_zero(make_engine):
    engine = make_engine(policy=pruning_policy("movement", schedule={"start_step": 5, "end_step": 10}))
    pm = method_of(engine)
    scores = pm.pruner.score_params
    before = {n: s.detach().clone() for n, s in scores.items()}
    seen = {}

    def capture(*_):
        seen.update(
            {
                n: (engine.params[n].grad.clone(), engine.params[n].detach().clone(), scores[n].grad.clone())
                for n in scores
            }
        )

    engine.optimizer.register_step_pre_hook(capture)
    engine.train_step()
    for n, (grad, weight, score_grad) in seen.items():
        assert torch.allclose(score_grad, grad * weight, atol=1e-7)  # straight-through: dL/dS = dL/dW' * W
        toward_zero = grad * weight > 1e-9  # descending this gradient shrinks |w|
        away = grad * weight < -1e-9
        assert toward_zero.any() and away.any()
        assert (scores[n][toward_zero] < before[n][toward_zero]).all(), n
        assert (scores[n][away] > before[n][away]).all(), n
    assert all(not any(s is p for p in engine.model.parameters()) for s in scores.values())


def test_movement_before_scores_move_prunes_by_magnitude(make_engine):
    """At step 0 every score is equal; ranking those in index order would cut whole leading tensors."""
    engine = make_engine(policy=pruning_policy("movement", schedule={"kind": "constant", "final_sparsity": 0.5}))
    pm = method_of(engine)
    assert pm.sparsity() == 0.0 and all((pm.pruner.score_params[n] == 0).all() for n in pm.targets)
    reference = copy.deepcopy(engine.model)
    pm.before_step(0)
    modules = [(reference.get_submodule(n.rpartition(".")[0]), "weight") for n in pm.targets]
    prune.global_unstructured(modules, pruning_method=prune.L1Unstructured, amount=0.5)
    for (module, _), n in zip(modules, pm.targets):
        assert torch.equal(pm.masks.keep(n), module.weight_mask.bool()), n
        assert 0.2 < pm.masks.pruned(n) / module.weight.numel() < 0.8, n


def test_movement_masks_follow_scores_and_lower_target_regrows_by_score(make_engine):
    engine = make_engine(policy=pruning_policy("movement", schedule={"kind": "constant", "final_sparsity": 0.6}))
    run_steps(engine, 3)
    pm = method_of(engine)
    engine.apply_change(Change(set={"pruning": {"schedule": {"final_sparsity": 0.2, "end_step": 3}}}), "test")
    old = {n: pm.masks.keep(n).clone() for n in pm.targets}
    pm.before_step(engine.step)  # what the next train_step does first
    assert pm.sparsity() == pytest.approx(0.2, abs=1e-4)
    flat_scores = torch.cat([pm.pruner.score_params[n].detach().flatten() for n in pm.targets])
    flat_keep = torch.cat([pm.masks.keep(n).flatten() for n in pm.targets])
    assert flat_scores[flat_keep].min() >= flat_scores[~flat_keep].max()  # kept = highest scores
    assert any((pm.masks.keep(n) & ~old[n]).any() for n in pm.targets)  # some weights came back


# --------------------------------------------------------------------------- live changes


def test_lowering_magnitude_target_regrows_largest_latent_weights(make_engine):
    engine = make_engine(policy=pruning_policy(schedule={"kind": "constant", "final_sparsity": 0.8}))
    run_steps(engine, 2)
    pm = method_of(engine)
    old = {n: pm.masks.keep(n).clone() for n in pm.targets}
    latent = {n: pm.masks.dense(n).abs() for n in pm.targets}
    engine.apply_change(Change(set={"pruning": {"schedule": {"final_sparsity": 0.5}}}), "test")
    engine.train_step()
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-4)
    regrown = torch.cat([latent[n][pm.masks.keep(n) & ~old[n]] for n in pm.targets])
    still_pruned = torch.cat([latent[n][~pm.masks.keep(n)] for n in pm.targets])
    assert regrown.numel() > 0 and regrown.min() >= still_pruned.max()
    assert all((pm.masks.keep(n) | ~old[n]).all() for n in pm.targets)  # nothing kept was pruned


def test_change_mid_schedule_continues_without_jump(make_engine):
    engine = make_engine(
        policy=pruning_policy(schedule={"start_step": 0, "end_step": 10, "every": 1, "final_sparsity": 0.8}),
        batch_size=4,
    )
    pm = method_of(engine)
    run_steps(engine, 4)
    now = pm.sparsity()
    engine.apply_change(Change(set={"pruning": {"schedule": {"final_sparsity": 0.5, "end_step": 10}}}), "test")
    series = []
    for _ in range(7):
        engine.train_step()
        series.append(pm.sparsity())
    assert series[0] == pytest.approx(now, abs=1e-4)  # the new ramp starts where the masks are
    assert all(abs(b - a) < 0.05 for a, b in zip([now, *series], series))  # no jump
    assert series[-1] == pytest.approx(0.5, abs=1e-4)  # new target at the new end step
    assert pm.stats(engine.step)["pruning"]["target"] == 0.5


def test_switching_method_and_scope_keeps_the_masks(make_engine):
    engine = make_engine(policy=pruning_policy(schedule={"kind": "constant", "final_sparsity": 0.5}))
    run_steps(engine, 2)
    pm = method_of(engine)
    engine.apply_change(Change(set={"pruning": {"method": "movement", "scope": "per_layer"}}), "test")
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-4)
    assert any(g.get("name") == "scores" for g in engine.optimizer.param_groups)
    engine.train_step()
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-4)
    for n in pm.targets:  # per_layer now: every tensor at the target
        assert pm.masks.pruned(n) == round(0.5 * engine.params[n].numel())
    engine.apply_change(Change(set={"pruning": {"method": "none"}}), "test")
    assert not pm.active and pm.masks.masks == {}
    assert not any(g.get("name") == "scores" for g in engine.optimizer.param_groups)


def test_bad_pruning_settings_get_clear_messages(make_engine):
    with pytest.raises(PolicyError, match=r"pruning\.schedule\.final_sparsity.*less than 1"):
        parse_policy({"pruning": {"method": "magnitude", "schedule": {"final_sparsity": 1.0}}})
    with pytest.raises(PolicyError, match=r"pruning\.movement\.threshold"):
        parse_policy({"pruning": {"method": "soft_movement", "movement": {"threshold": 1.5}}})
    with pytest.raises(PolicyError, match=r"pruning\.movement\.final_threshold.*greater than 0"):
        parse_policy({"pruning": {"method": "soft_movement", "movement": {"final_threshold": 0}}})
    with pytest.raises(PolicyError, match="leaves no parameter"):
        make_engine(policy=pruning_policy(targets=["*query.weight"], exclude=["*attention*"]))
    with pytest.raises(PolicyError, match="1-D"):
        make_engine(policy=pruning_policy(targets=["*.bias"]))
    with pytest.raises(PolicyError, match="matches no parameter"):
        make_engine(policy=pruning_policy(targets=["*.qeury.weight"]))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_checkpoint_holds_masked_weights_and_resume_restores_masks(make_engine, tmp_path, method):
    run_dir = tmp_path / "run"
    engine = make_engine(policy=pruning_policy(method), run_dir=run_dir, steps=6, batch_size=4)
    run_steps(engine, 3)
    path = engine.save_checkpoint()
    pm = method_of(engine)
    saved = load_file(str(path / "model.safetensors"), device=str(engine.device))
    for n in pm.targets:
        assert torch.equal(saved[n], engine.params[n].detach())
        assert (saved[n][~pm.masks.keep(n)] == 0).all()
    resumed = make_engine(policy=pruning_policy(method), run_dir=tmp_path / "run2", steps=6, batch_size=4)
    resumed.resume_from(path)
    rm = method_of(resumed)
    for n in pm.targets:
        assert torch.equal(rm.masks.keep(n), pm.masks.keep(n))
        assert torch.equal(rm.masks.param(n), pm.masks.param(n))
        assert torch.equal(rm.masks.dense(n), pm.masks.dense(n))  # latent values too (regrowth needs them)
    if method == "movement":
        for n in pm.targets:
            assert torch.equal(rm.pruner.score_params[n], pm.pruner.score_params[n])
    assert rm.pruner.ramp == pm.pruner.ramp
    run_steps(resumed, 3)
    assert rm.sparsity() == pytest.approx(0.7, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "distilbert"])
def test_masks_work_across_architectures(tokenizer, arch):
    task = "lm" if arch in ("gpt2", "llama") else "classification"
    model = build_tiny(arch, tokenizer, task).eval()
    reference = copy.deepcopy(model)
    masks = MaskedWeights(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                keep = torch.rand(p.shape, generator=g) > 0.5
                masks.set(name, keep)
                reference.get_parameter(name).mul_(keep)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids)[0], reference(input_ids=ids)[0], atol=1e-6)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    masks.clear()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids)[0], reference(input_ids=ids)[0], atol=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_masks_hold_when_lora_wraps_a_pruned_layer(make_engine, method):
    engine = make_engine(policy=pruning_policy(method, schedule={"kind": "constant", "final_sparsity": 0.5}))
    run_steps(engine, 1)
    pm = method_of(engine)
    name = next(n for n in pm.targets if n.endswith("query.weight"))
    weight = pm.masks.param(name)
    engine.apply_change(Change(set={"peft": {"method": "lora", "target_modules": ["query", "value"]}}), "test")
    assert not any(n == name for n, _ in engine.model.named_parameters())  # peft renamed it (...base_layer.weight)
    run_steps(engine, 2)  # the base weight is frozen under LoRA; the masks still hold and every step runs
    assert name in pm.targets and name in engine.params and engine.params[name] is weight  # the stable name stays
    keep = pm.masks.keep(name)
    assert (weight[~keep] == 0).all() and (weight[keep] != 0).all()
    engine.apply_change(Change(set={"pruning": {"schedule": {"final_sparsity": 0.6}}}), "test")
    run_steps(engine, 1)
    assert pm.sparsity() == pytest.approx(0.6, abs=1e-3)


# --------------------------------------------------------------------------- structured


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_heads_neurons_structure_prunes_whole_groups(make_engine, arch, method):
    from spu_engine.methods.pruning.structure import families

    engine = make_engine(
        arch,
        policy=parse_policy(
            {
                "pruning": {
                    "method": method,
                    "structure": "heads_neurons",
                    "scope": "per_layer",
                    "schedule": {"start_step": 0, "end_step": 4, "every": 2, "final_sparsity": 0.5},
                }
            }
        ),
    )
    run_steps(engine, 5)
    pm = method_of(engine)
    fams = families(engine.model, pm.targets)
    assert {f.kind for f in fams} == {"head", "neuron"} and len(fams) == 8
    assert {s.name for f in fams for s in f.slabs} == set(pm.targets)  # classifier / pooler are not targets here
    shapes = {n: engine.params[n].shape for n in pm.targets}
    pruned_by_block: dict[int, list[int]] = {}
    for f in fams:
        per = f.weights_per_group(shapes)
        cell = pruned_by_block.setdefault(f.block, [0, 0, 0])  # pruned, total, largest group
        for g in range(f.count):
            parts = [pm.masks.keep(s.name).narrow(s.axis, s.offset + g * s.size, s.size) for s in f.slabs]
            assert all(p.all() for p in parts) or not any(p.any() for p in parts), (
                f.kind,
                f.block,
                g,
            )  # all or nothing
            cell[0] += 0 if parts[0].all() else per
        cell[1] += per * f.count
        cell[2] = max(cell[2], per)
    for block, (pruned, total, largest) in pruned_by_block.items():
        assert abs(pruned - 0.5 * total) <= largest, block  # per_layer: every block at the target, within one group


def test_soft_movement_cannot_be_structured():
    with pytest.raises(PolicyError, match="structure: heads_neurons works with magnitude, imp and movement"):
        parse_policy({"pruning": {"method": "soft_movement", "structure": "heads_neurons"}})


def test_movement_scores_learn_only_while_their_weight_trains(make_engine):
    policy = pruning_policy("movement", schedule={"start_step": 50, "end_step": 60})
    policy.freeze = parse_policy({"freeze": [{"layers": [0], "trainable": False}]}).freeze
    engine = make_engine(policy=policy)
    pm = method_of(engine)
    block0 = [n for n in pm.targets if ".layer.0." in n]
    before = {n: pm.pruner.score_params[n].detach().clone() for n in pm.targets}
    run_steps(engine, 2)
    assert all(torch.equal(pm.pruner.score_params[n], before[n]) for n in block0)  # a frozen weight does not move
    assert all(not torch.equal(pm.pruner.score_params[n], before[n]) for n in pm.targets if n not in block0)
    engine.apply_change(Change(freeze=[{"layers": [0], "trainable": True}]), "test")
    run_steps(engine, 2)
    assert all(
        not torch.equal(pm.pruner.score_params[n], before[n]) for n in block0
    )  # unfrozen: its scores learn again
