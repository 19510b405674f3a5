"""An export records the machine its numbers depend on (device, threads, versions); a replay takes its threads and
says plainly when its own machine differs, since its losses then match only to float precision."""

from __future__ import annotations

import json

import torch

from spu_engine.core.machine import Machine, replay_note
from spu_engine.core.policy import Policy
from spu_engine.core.policy_files import policy_from_yaml
from spu_engine.core.run_setup import config_from_policy


def test_an_export_records_the_machine_and_reads_back(make_engine):
    engine = make_engine()  # torch's threads as they are (an engine's --threads would set them for the whole process)
    exported = engine.replayable_policy()
    threads = torch.get_num_threads()
    assert exported.machine is not None and exported.machine.threads == threads and exported.machine.device == "cpu"
    text = exported.to_yaml()
    assert f"machine:\n  device: cpu\n  threads: {threads}\n  torch: " in text
    assert policy_from_yaml(text).machine == exported.machine


def test_a_replay_takes_the_recorded_threads_unless_told(tiny_model_dir):
    recorded = Machine(device="cpu", threads=1, torch="2", transformers="5")
    policy = Policy(machine=recorded)
    assert config_from_policy(policy, None, model=str(tiny_model_dir), task="classification").threads == 1
    assert config_from_policy(policy, None, model=str(tiny_model_dir), task="classification", threads=2).threads == 2
    assert config_from_policy(Policy(), None, model=str(tiny_model_dir), task="classification").threads is None


def test_a_replay_on_another_machine_says_so(make_engine, tmp_path):
    here = make_engine().replayable_policy().machine.model_copy(update={"threads": 1})
    assert replay_note(here, here) is None  # the same machine: the losses repeat exactly, nothing to say
    elsewhere = here.model_copy(update={"threads": 64, "torch": "1.0"})
    assert replay_note(elsewhere, here) == (
        "this run replays a policy recorded on another machine (threads 1 here, 64 in the export; torch "
        f"{here.torch} here, 1.0 in the export): its losses and metrics may differ from the recorded run's in the "
        "last decimals"
    )
    engine = make_engine(policy=Policy(machine=elsewhere), run_dir=tmp_path / "run")
    engine.close()
    said = replay_note(elsewhere, engine.replayable_policy().machine)
    assert said is not None
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "log" and e["level"] == "warning" and e["message"] == said for e in events)
