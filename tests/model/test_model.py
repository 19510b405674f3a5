"""Units are found generically; selectors are checked against the real parameter names."""

from __future__ import annotations

import pytest

from spu_engine.core.model_source import ModelLoadError
from spu_engine.core.policy import FreezeRule, Policy, PolicyError
from spu_engine.core.policy_files import policy_from_yaml
from spu_engine.model.loading import find_units, load_model
from spu_engine.runtime.selection import check_policy_against_model, freeze_mask
from support import build_tiny

ARCHS = ["bert", "distilbert", "roberta", "gpt2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_in_exactly_one_unit(arch, tokenizer):
    model = build_tiny(arch, tokenizer)
    units = find_units(model)
    names = [n for n, _ in model.named_parameters()]
    assigned = [n for u in units for n in u.params]
    assert sorted(assigned) == sorted(names) and len(assigned) == len(set(assigned))
    assert units.names == ["embeddings", "block0", "block1", "block2", "block3", "head"]
    assert sum(u.numel for u in units) == sum(p.numel() for p in model.parameters())
    # the classifier / score head is in "head", word embeddings in "embeddings"
    assert any("embed" in n or "wte" in n for n in units["embeddings"].params)
    assert any("classifier" in n or "score" in n for n in units["head"].params)


def test_freeze_rules_last_match_wins(tokenizer):
    model = build_tiny("bert", tokenizer)
    units = find_units(model)
    names = [n for n, _ in model.named_parameters()]
    rules = policy_from_yaml("""
freeze:
  - {match: "*", trainable: false}
  - {layers: [-1], trainable: true}
  - {match: "*.bias", trainable: true}
  - {units: [head], trainable: true}
""").freeze
    mask = freeze_mask(rules, names, units)
    for n in names:
        expected = units.unit_of[n] in ("block3", "head") or n.endswith(".bias")
        assert mask[n] == expected, n


def _check(tokenizer, rules):
    model = build_tiny("bert", tokenizer)
    check_policy_against_model(Policy(freeze=rules), model, find_units(model))


def test_block_index_out_of_range(tokenizer):
    with pytest.raises(
        PolicyError, match=r"freeze\[0\].layers\[1\]: block index 7 is out of range; this model has 4 blocks \(0-3"
    ):
        _check(tokenizer, [FreezeRule(layers=[1, 7], trainable=False)])


def test_pattern_matching_nothing_names_the_name_meant(tokenizer):
    with pytest.raises(
        PolicyError,
        match=r"freeze\[0\].match: pattern 'bert.encoder.layer.0.atention.self.query.weight' matches no parameter of this "
        r"model; did you mean 'bert.encoder.layer.0.attention.self.query.weight'\?$",
    ):
        _check(tokenizer, [FreezeRule(match="bert.encoder.layer.0.atention.self.query.weight", trainable=False)])


def test_a_misspelt_glob_is_answered_with_the_glob_meant_and_real_names_it_selects(tokenizer):
    with pytest.raises(PolicyError) as err:
        _check(tokenizer, [FreezeRule(match="*attentoin*", trainable=False)])
    assert str(err.value) == (
        "freeze[0].match: pattern '*attentoin*' matches no parameter of this model; did you mean '*attention*' "
        "(40 parameters, e.g. bert.encoder.layer.0.attention.self.query.weight)?"
    )


def test_every_selector_error_is_reported_not_only_the_first(tokenizer):
    model = build_tiny("bert", tokenizer)
    policy = policy_from_yaml(
        "freeze:\n  - {match: '*LayerNorn*', trainable: false}\n  - {units: [embedding], trainable: false}\n"
        "  - {layers: [9], trainable: false}\n"
        "pruning: {method: magnitude, targets: ['*.qurey.weight']}\n"
    )
    with pytest.raises(PolicyError) as err:
        check_policy_against_model(policy, model, find_units(model))
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "freeze[0].match",
        "freeze[1].units[0]",
        "freeze[2].layers[0]",
        "pruning.targets[0]",
    ]
    assert "did you mean '*LayerNorm*'" in lines[0] and "did you mean '*.query.weight'" in lines[3]


def test_unknown_unit_is_named(tokenizer):
    with pytest.raises(
        PolicyError, match=r"freeze\[0\].units\[0\]: unknown unit 'embedding'.*did you mean 'embeddings'"
    ):
        _check(tokenizer, [FreezeRule(units=["embedding"], trainable=False)])


def test_nonexistent_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model path '.*nowhere' does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_model_is_one_clear_error():
    with pytest.raises(ModelLoadError, match=r"cannot load a classification model from 'distilbert-base-uncased'"):
        load_model("distilbert-base-uncased")


def test_timeline_sets_are_checked_against_the_model_too(tokenizer):
    model = build_tiny("bert", tokenizer)
    policy = policy_from_yaml(
        "timeline:\n  - {step: 3, set: {pruning: {method: magnitude, targets: ['*.atention.*.weight']}}}\n"
    )
    with pytest.raises(
        PolicyError,
        match=r"timeline\[0\]\.set\.pruning\.targets\[0\]: pattern '\*\.atention\.\*\.weight' matches no parameter",
    ):
        check_policy_against_model(policy, model, find_units(model))


def test_policy_validate_with_a_model_lists_every_selector_error(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from spu_engine.cli import app

    path = tmp_path / "p.yaml"
    path.write_text(
        "freeze:\n  - {match: '*attentoin*', trainable: false}\n  - {units: [embedding], trainable: false}\n"
    )
    result = CliRunner().invoke(app, ["policy", "validate", str(path), "--model", str(tiny_model_dir)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in text
    assert (
        "freeze[0].match: pattern '*attentoin*' matches no parameter of this model; did you mean '*attention*'" in text
    )
    assert "freeze[1].units[0]: unknown unit 'embedding'" in text and "did you mean 'embeddings'" in text
