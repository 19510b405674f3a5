"""Every boolean on the socket (commands, and the policy models a change or a policy carries) takes true or false
only: "yes", 1 or "true" would be a guess at what the client meant."""

from __future__ import annotations

import json

import pytest

from spu_engine.core.policy import Change, Policy, PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.core.protocol import ProtocolError, parse_command

NOT_BOOLEANS = ["yes", "true", 1, 0, "1", "on"]


@pytest.mark.parametrize("value", NOT_BOOLEANS)
@pytest.mark.parametrize(
    ("command", "where"),
    [
        ({"cmd": "stop", "checkpoint": None}, "stop: checkpoint"),
        ({"cmd": "export", "path": "p.yaml", "overwrite": None}, "export: overwrite"),
        ({"cmd": "change", "change": {"freeze": [{"layers": [0], "trainable": None}]}}, "change.freeze.0.trainable"),
    ],
)
def test_a_command_refuses_a_boolean_that_is_not_one(command, where, value):
    text = json.dumps(command).replace("null", json.dumps(value))
    with pytest.raises(ProtocolError) as err:
        parse_command(text.encode())
    assert where in str(err.value)
    assert f"must be true or false (a boolean, not a string or a number) (got {value!r})" in str(err.value)


def test_true_and_false_are_taken():
    assert parse_command(b'{"cmd": "stop", "checkpoint": false}').checkpoint is False
    assert parse_command(b'{"cmd": "export", "path": "p.yaml", "overwrite": true}').overwrite is True


def test_a_policy_refuses_a_string_for_a_boolean():
    with pytest.raises(PolicyError, match=r"timeline\[0\]\.once: must be true or false .*\(got 'yes'\)"):
        parse_policy({"timeline": [{"when": {"metric": "eval_loss", "below": 0.5}, "once": "yes", "set": {}}]})


@pytest.mark.parametrize(
    "section",
    [
        {"memory": {"gradient_checkpointing": "yes"}},
        {"peft": {"method": "lora", "use_dora": "yes"}},
        {"peft": {"method": "lora", "use_rslora": "yes"}},
        {"auto_freeze": {"method": "lisa", "head": "yes"}},
        {"auto_freeze": {"method": "lisa", "embeddings": "yes"}},
        {"auto_freeze": {"method": "autofreeze", "allow_gaps": "yes"}},
        {"distillation": {"enabled": "yes"}},
        {"weight_update_skipping": {"enabled": "yes"}},
    ],
)
def test_a_change_that_sets_a_boolean_section_field_refuses_a_string(section):
    line = json.dumps({"cmd": "change", "change": {"set": section}}).encode()
    [(name, fields)] = section.items()
    key = next(k for k, v in fields.items() if v == "yes")
    with pytest.raises(PolicyError, match=rf"{name}\.{key}: must be true or false .*\(got 'yes'\)"):
        Policy().apply(parse_command(line).change)
    assert Policy().apply(Change(set={"memory": {"gradient_checkpointing": True}})).memory.gradient_checkpointing
