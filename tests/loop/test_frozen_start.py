"""A policy file that freezes every tensor from the start is said at the start, as the same change from a console is."""

from __future__ import annotations

from spu_engine.core.policy_files import parse_policy

NOTHING_TRAINS = "no parameter trains now: the freeze rules and the methods together leave none; steps change nothing"


def test_a_policy_freezing_every_tensor_warns_when_training_starts(make_engine):
    engine = make_engine(policy=parse_policy({"freeze": [{"match": "*", "trainable": False}]}), steps=2)
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    assert engine.run() == "finished"
    said = [(e["level"], e["message"]) for e in events if e["type"] == "log" and e["message"] == NOTHING_TRAINS]
    assert said == [("warning", NOTHING_TRAINS)]
    kinds = ["warned" if e.get("message") == NOTHING_TRAINS else e["type"] for e in events]
    assert kinds.index("warned") < kinds.index("step")  # at the start, before the first step


def test_a_policy_that_trains_something_says_nothing_of_the_kind(make_engine):
    engine = make_engine(policy=parse_policy({"freeze": [{"layers": "0-2", "trainable": False}]}), steps=1)
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    engine.run()
    assert not any(e["type"] == "log" and e["message"] == NOTHING_TRAINS for e in events)
