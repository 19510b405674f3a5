"""Methods added to a running engine: over the socket, and through a checkpoint resume."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, Policy, PolicyError
from spu_engine.core.spawn import spawn_engine
from spu_engine.core.transport import EngineClient
from spu_engine.loop.engine import EngineConfig
from spu_engine.methods.selective_backprop.method import SelectiveBackprop
from spu_engine.model.houlsby import BottleneckAdapter
from support import SST2


@pytest.mark.process
def test_add_adapters_and_selective_backprop_over_the_socket(tiny_model_dir, tmp_path):
    config = EngineConfig(
        model=str(tiny_model_dir),
        data=str(SST2),
        steps=5000,
        batch_size=8,
        max_length=32,
        lr=1e-3,
        warmup=0,
        eval_every=0,
        stats_every=1,
        max_train_samples=256,
        max_eval_samples=32,
        threads=1,
    )
    proc = spawn_engine(config, Policy(), tmp_path / "run")
    client = EngineClient(tmp_path / "run" / "control.sock").connect(timeout=60)
    try:
        client.wait_for(lambda e: e["type"] == "step" and e["step"] >= 2, 60)
        cid = client.send(
            "change",
            change={
                "set": {
                    "peft": {"method": "adapter", "size": 4},
                    "selective_backprop": {"mode": "percentile", "keep": 0.5},
                }
            },
        )
        policy = client.wait_for(
            lambda e: e["type"] == "policy" and e["source"] == "client", 30
        )  # emitted before the ack
        ack = client.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 30)
        assert ack["ok"] and ack["step"] == policy["step"], ack
        assert "bert.encoder.layer.0.attention.self.query.weight" in policy["frozen_tensors"]
        units = client.wait_for(lambda e: e["type"] == "units" and e["step"] > ack["step"], 60)
        assert units["tensors"]["bert.encoder.layer.0.attention.output.attn_adapter.down.weight"]["trainable"]
        assert units["units"]["block0"]["update_ratio"] > 0  # the new tensors train from the next step on
        step = client.wait_for(lambda e: e["type"] == "step" and e["step"] > ack["step"] + 1, 60)
        assert step["sb_backward"] == 8 and 0 < step["sb_kept_fraction"] <= 1 and step["samples"] > 0
        cid = client.send("change", change={"set": {"peft": {"method": "none"}}})
        ack = client.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 30)
        assert not ack["ok"] and "peft.method: cannot change 'adapter' to 'none'" in ack["message"]
        client.send("stop", checkpoint=False)
        client.wait_for(lambda e: e["type"] == "state" and e["state"] == "stopped", 60)
        assert proc.wait(30) == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_resume_restores_adapters_added_live(make_engine, tmp_path):
    engine = make_engine("bert", run_dir=tmp_path / "run", batch_size=8)
    engine.train_step()
    engine.apply_change(
        Change(
            set={"peft": {"method": "adapter", "size": 4}, "selective_backprop": {"mode": "percentile", "keep": 0.5}}
        ),
        source="client",
    )
    engine.train_step()
    engine.train_step()
    path = engine.save_checkpoint()
    saved = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    sb_state = next(m for m in engine.methods if isinstance(m, SelectiveBackprop)).state_dict()

    resumed = make_engine("bert", run_dir=tmp_path / "resumed", batch_size=8)
    resumed.resume_from(path)
    assert resumed.param_names == engine.param_names
    assert all(torch.equal(p, saved[n]) for n, p in resumed.model.named_parameters())
    assert sum(isinstance(m, BottleneckAdapter) for m in resumed.model.modules()) == 8
    adapter_param = dict(resumed.model.named_parameters())["bert.encoder.layer.0.output.ffn_adapter.up.weight"]
    assert adapter_param in resumed.optimizer.state  # its AdamW moments came back too
    assert next(m for m in resumed.methods if isinstance(m, SelectiveBackprop)).state_dict() == sb_state
    with pytest.raises(PolicyError, match="have trained"):
        resumed.apply_change(Change(set={"peft": {"method": "none"}}), source="client")
    resumed.train_step()
