"""Policy: YAML round trip, change algebra, and errors that name the key and value."""

from __future__ import annotations

import json

import pytest
import yaml

from spu_engine.core.policy import Change, FreezeRule, Policy, PolicyError
from spu_engine.core.policy_files import json_schema, load_policy, policy_from_yaml

FULL = """
spu_policy: 1
freeze:
  - {match: "*", trainable: false}
  - {layers: "4-5", trainable: true}
  - {units: head, trainable: true}
  - {match: "*.bias", trainable: true}
selective_backprop: {mode: percentile, keep: 0.25}
weight_update_skipping: {enabled: true, patience: 3}
pruning:
  method: magnitude
  scope: per_layer
  targets: ["*.attention.*.weight"]
  schedule: {kind: cubic, start_step: 10, end_step: 100, every: 5, final_sparsity: 0.8}
peft: {method: lora, r: 4}
timeline:
  - {step: 30, freeze: [{layers: [3], trainable: true}]}
  - {step: 10, set: {selective_backprop: {keep: 0.5}}}
"""


def test_yaml_round_trip_is_equal(tmp_path):
    p = policy_from_yaml(FULL)
    path = tmp_path / "p.yaml"
    path.write_text(p.to_yaml())
    again = load_policy(path)
    assert again == p
    assert load_policy(path).to_yaml() == again.to_yaml()
    assert p.freeze[1].layers == [4, 5]
    assert [e.step for e in p.timeline] == [10, 30]  # sorted by step


def test_change_appends_freeze_rules_and_merges_sections():
    p = policy_from_yaml(FULL)
    q = p.apply(Change(freeze=[FreezeRule(layers=[0], trainable=False)], set={"selective_backprop": {"keep": 0.75}}))
    assert q.freeze[-1].layers == [0] and len(q.freeze) == len(p.freeze) + 1
    assert q.selective_backprop.keep == 0.75 and q.selective_backprop.mode == "percentile"  # merged, not replaced
    assert p.selective_backprop.keep == 0.25  # original untouched


def test_a_rule_repeating_an_earlier_selector_replaces_it_and_what_trains_is_unchanged():
    """Toggling one tensor over and over keeps one rule (the console lists them; every change checks them all)."""
    p = Policy(freeze=[FreezeRule(units=["head"], trainable=False)])
    for trainable in (False, True, False, True, False):
        p = p.apply(Change(freeze=[FreezeRule(match="*.bias", trainable=trainable)]))
    p = p.apply(Change(freeze=[FreezeRule(layers=[1, 0], trainable=True)]))
    p = p.apply(Change(freeze=[FreezeRule(layers=[0, 1], trainable=False)]))
    assert [(r.match, r.layers, r.units, r.trainable) for r in p.freeze] == [
        (None, None, ["head"], False),
        ("*.bias", None, None, False),
        (None, [0, 1], None, False),
    ]


def test_at_step_replays_timeline():
    p = policy_from_yaml(FULL)
    assert p.at_step(9).selective_backprop.keep == 0.25
    assert p.at_step(10).selective_backprop.keep == 0.5
    assert len(p.at_step(30).freeze) == len(p.freeze) + 1


def test_change_with_bad_section_value_is_refused():
    p = Policy()
    with pytest.raises(PolicyError, match=r"selective_backprop.keep: Input should be greater than 0 \(got -1\)"):
        p.apply(Change(set={"selective_backprop": {"keep": -1}}))


@pytest.mark.parametrize(
    "text, message",
    [
        ("freeze: [\n", r"malformed YAML at line 2, column 1"),
        ("freez: []\n", r"unknown key 'freez' at the top level; did you mean 'freeze'\?"),
        (
            "selective_backprop: {mode: percentile, kep: 0.5}\n",
            r"unknown key 'kep' in selective_backprop; did you mean 'keep'\?",
        ),
        ("selective_backprop: {keep: high}\n", r"selective_backprop.keep: Input should be a valid number.*got 'high'"),
        (
            "freeze: [{layers: [1], trainable: maybe}]\n",
            r"freeze\[0\].trainable: must be true or false.*'maybe'",
        ),
        (
            "freeze: [{trainable: false}]\n",
            r"freeze\[0\]: a freeze rule needs at least one of 'match', 'layers', 'units'",
        ),
        ("freeze: [{layers: '5-2', trainable: false}]\n", r"range '5-2' is empty"),
        (
            "pruning: {schedule: {final_sparsity: 1.0}}\n",
            r"pruning.schedule.final_sparsity: Input should be less than 1",
        ),
        ("pruning: {schedule: {start_step: 50, end_step: 10}}\n", r"end_step \(10\) must be >= start_step \(50\)"),
        ("timeline: [{step: 3, set: {frezze: []}}]\n", r"timeline\[0\].set: unknown section 'frezze'"),
        ("- just a list\n", r"a policy must be a mapping of sections, got list"),
        ("spu_policy: 2\n", r"spu_policy: Input should be 1"),
        ("run: {steps: 0}\n", r"run.steps: Input should be greater than or equal to 1 \(got 0\)"),
        ("run: {stepz: 10}\n", r"unknown key 'stepz' in run; did you mean 'steps'\? Allowed: model, data, task, steps"),
        ("run: {device: cuda}\n", r"unknown key 'device' in run; Allowed: model, "),
        ("run: {task: vision}\n", r"run.task: unknown task 'vision'; tasks are classification, qa, lm"),
        ("run: {precision: fp8}\n", r"run.precision: String should match pattern"),
        ("timeline: [{step: 3, set: {run: {steps: 5}}}]\n", r"timeline\[0\].set: unknown section 'run'"),
    ],
)
def test_bad_input_names_key_and_value(text, message):
    with pytest.raises(PolicyError, match=message):
        policy_from_yaml(text, source="p.yaml")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "nope.yaml")


def test_json_schema_describes_sections():
    schema = json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) >= {"run", "freeze", "selective_backprop", "pruning", "peft", "timeline"}
    assert {"model", "data", "steps", "lr", "warmup", "seed"} <= set(schema["$defs"]["RunSettings"]["properties"])


def test_saved_yaml_lists_only_choices(tmp_path):
    p = Policy(freeze=[FreezeRule(units=["embeddings"], trainable=False)])
    text = p.to_yaml()
    assert "selective_backprop" not in text and "embeddings" in text
    assert policy_from_yaml(text) == p


def test_run_section_is_written_in_full_and_is_not_part_of_the_state(tmp_path, monkeypatch):
    from spu_engine.core.config import EngineConfig, RunSettings

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    monkeypatch.chdir(tmp_path)
    config = EngineConfig(model="minilm", data="data", steps=40, lr=1e-3, warmup=0, device="cpu", threads=2)
    p = Policy(run=config.run_settings(), freeze=[FreezeRule(units=["embeddings"], trainable=False)])
    text = p.to_yaml()
    again = policy_from_yaml(text)
    assert again == p
    written = yaml.safe_load(text)["run"]
    assert set(written) == set(RunSettings.model_fields)  # defaults included: a replay never depends on them
    assert "device" not in written and "threads" not in written
    assert (
        written["data"] == str(tmp_path / "data") and written["model"] == "minilm"
    )  # a local path replays from anywhere
    assert written["task"] == "classification" and written["warmup"] == 0 and written["max_train_samples"] is None
    assert (
        p.sections().run is None and p.at_step(10).run is None
    )  # the sections in force; run settings never change mid-run


def test_every_timeline_set_is_validated_at_load_and_named_as_in_the_file():
    text = "timeline:\n  - {step: 9, set: {faults: {on_nonfinite: stop}}}\n  - {step: 3, set: {pruning: {bogus_key: 1, method: nonsense}}}\n"
    with pytest.raises(PolicyError) as err:
        policy_from_yaml(text, "p.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "p.yaml: invalid policy"
    assert (
        "  timeline[1].set.pruning.method: Input should be 'none', 'magnitude', 'imp', 'movement' or 'soft_movement' (got 'nonsense')"
        in lines
    )
    allowed = "method, scope, targets, exclude, structure, schedule, imp, movement"
    assert f"  unknown key 'bogus_key' in timeline[1].set.pruning; Allowed: {allowed}" in lines
    # a set that is only wrong once merged with what came before it (end before start)
    merged = (
        "pruning: {method: magnitude, schedule: {start_step: 50, end_step: 60}}\n"
        "timeline:\n  - {step: 5, set: {pruning: {schedule: {end_step: 20}}}}\n"
    )
    with pytest.raises(
        PolicyError, match=r"timeline\[0\]\.set\.pruning\.schedule: end_step \(20\) must be >= start_step \(50\)"
    ):
        policy_from_yaml(merged)


@pytest.mark.parametrize(
    "text, message",
    [
        ("freeze: " + "[" * 1000 + "]" * 1000, "nested more than 32 levels deep at line 1"),
        ("".join("  " * i + f"k{i}:\n" for i in range(200)), "nested more than 32 levels deep at line 32"),
        ("a: &a [*a]", "an alias refers to a node that contains it"),
        # a billion laughs inside a timeline `set`: small on disk, gigabytes once expanded
        (
            "timeline:\n  - {step: 1, set: {pruning: {targets: &l0 ['*.a', '*.b', '*.c', '*.d', '*.e', '*.f', '*.g', '*.h', '*.i']}}}\n"
            + "".join(
                f"  - {{step: {i + 2}, set: {{pruning: {{targets: &l{i + 1} [{', '.join([f'*l{i}'] * 9)}]}}}}}}\n"
                for i in range(8)
            ),
            "more than 200,000 values once YAML aliases are expanded",
        ),
    ],
)
def test_nesting_and_alias_expansion_are_bounded_before_anything_is_built(text, message):
    with pytest.raises(PolicyError, match=message):
        policy_from_yaml(text, "p.yaml")


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("w") as f:
        f.write("spu_policy: 1\n")
        for _ in range(50_000):  # 2.5 MB of comments: valid YAML, absurd as a policy
            f.write("# " + "x" * 48 + "\n")
    with pytest.raises(PolicyError, match="more than 1,048,576 bytes; a policy file may hold at most 1 MiB"):
        load_policy(path)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "prunning: {method: magnitude}\n",
            "  unknown key 'prunning' at the top level; did you mean 'pruning'? Allowed: ",
        ),
        (
            "selective_backprop: {keeep: 0.3}\n",
            "  unknown key 'keeep' in selective_backprop; did you mean 'keep'? Allowed: ",
        ),
        (
            "freeze: [{layer: 0-3, trainable: false}]\n",
            "  unknown key 'layer' in freeze[0]; did you mean 'layers'? Allowed: ",
        ),
        (
            "timeline: [{step: 2, set: {prunning: {}}}]\n",
            "  timeline[0].set: unknown section 'prunning'; did you mean 'pruning'?",
        ),
    ],
)
def test_a_misspelt_key_is_answered_with_the_nearest_allowed_one(text, line):
    with pytest.raises(PolicyError) as err:
        policy_from_yaml(text, source="p.yaml")
    message = str(err.value)
    assert line in message and "not allowed in" not in message, message


def test_an_unknown_key_lists_every_key_the_mapping_allows():
    with pytest.raises(PolicyError) as err:
        policy_from_yaml("selective_backprop: {keeep: 0.3}\n", source="p.yaml")
    assert str(err.value).endswith("Allowed: mode, threshold, keep, floor, history")
