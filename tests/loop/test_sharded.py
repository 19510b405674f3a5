"""FSDP2 on two ranks (gloo, CPU mesh): a policy that changes what trains at four steps, plus a live change through
the socket, ends where one process trained on the concatenated batches ends; its sharded checkpoint resumes on one
rank and on two with the same next losses, and exports to a folder plain ``from_pretrained`` loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ranks_support import (
    ENV,
    NO_TORCHRUN,
    TORCHRUN,
    assert_same_model,
    run,
    step_losses,
    tiny_folders,
    train_args,
    two_ranks,
    weights,
)

from spu_engine.core.transport import EngineClient
from spu_engine.storage.sharded_checkpoint import is_sharded
from support import SST2

pytestmark = [pytest.mark.process, NO_TORCHRUN]

# a tensor frozen at step 3, LoRA from step 5 (planned before sharding), magnitude pruning from step 6, LISA every 4
POLICY = """
auto_freeze: {method: lisa, interval: 4, n_layers: 2}
timeline:
  - {step: 3, freeze: [{match: "%s", trainable: false}]}
  - {step: 5, set: {peft: {method: lora, r: 4, alpha: 8, target_modules: [%s]}}}
  - {step: 6, set: {pruning: {method: magnitude, schedule: {start_step: 6, end_step: 9, every: 1, final_sparsity: 0.5}}}}
"""
POOLING = {"bert": ("--pooling", "mean"), "llama": ()}  # mean pooling's hook on the encoder survives sharding too
ARCH = {  # the tensor frozen at step 3, LoRA's targets
    "bert": ("*layer.1.output.dense.weight", "query, value"),
    "llama": ("*layers.1.mlp.up_proj.weight", "q_proj, v_proj"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    return tiny_folders(tmp_path_factory, tokenizer)


@pytest.mark.parametrize("arch", ["bert", pytest.param("llama", marks=pytest.mark.slow)])  # keeps CI under 20 min
def test_two_ranks_with_live_changes_match_one_process(models, arch, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % ARCH[arch])
    two = tmp_path / "two"
    proc = subprocess.Popen(
        [
            *two_ranks(29561 if arch == "bert" else 29562),
            *train_args(models[arch], arch, two, 4, 14, policy, *POOLING[arch]),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = EngineClient(two / "control.sock").connect(timeout=120)
        client.wait_for(lambda e: e["type"] == "step" and e["step"] >= 1, 120)
        cid = client.send("change", change={"freeze": [{"units": ["head"], "trainable": False}]})  # live, on both
        ack = client.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 60)
        assert ack["ok"], ack
        client.close()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-6000:]
    final = two / "checkpoints" / "step-0000014"
    assert is_sharded(final)
    # the one-process reference replays what the two ranks recorded (the live change at its step) with the global batch
    one = tmp_path / "one"
    run([sys.executable, *train_args(models[arch], arch, one, 8, 14, two / "policy.yaml")])
    if arch == "bert":  # the policy's run: section carried the pooling to the reference
        assert json.loads((one / "config.json").read_text())["pooling"] == "mean"
    theirs, ours = weights(final), weights(one / "checkpoints" / "step-0000014")
    assert_same_model(ours, theirs)
    assert any(".lora_B." in n and theirs[n].abs().sum() > 0 for n in theirs), "LoRA trained"
    pruned = [n for n in theirs if n.endswith("dense.weight") or n.endswith("proj.weight")]
    assert any((theirs[n] == 0).float().mean() > 0.3 for n in pruned), "pruning masked weights"
    assert step_losses(two) == pytest.approx(step_losses(one), abs=2e-5)


def _resumed_at_6(source, again, prefix: list[str], batch: str) -> dict[int, float]:
    """The losses of a copy of run ``source`` resumed from its step-6 checkpoint by ``prefix`` (one process or two)."""
    again.mkdir()
    for name in ("config.json", "policy.yaml"):
        (again / name).write_bytes((source / name).read_bytes())
    (again / "checkpoints").mkdir()
    subprocess.run(["cp", "-r", str(source / "checkpoints" / "step-0000006"), str(again / "checkpoints")], check=True)
    run([*prefix, "-m", "spu_engine.cli", "train", "--resume", str(again), "--batch-size", batch])
    return step_losses(again)


def test_checkpoints_resume_across_world_sizes_and_a_sharded_one_exports(models, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % ARCH["bert"])
    sharded = tmp_path / "two"
    run([*two_ranks(29563), *train_args(models["bert"], "bert", sharded, 4, 8, policy, "--checkpoint-every", "6")])
    assert is_sharded(sharded / "checkpoints" / "step-0000006")
    losses = step_losses(sharded)
    cases = {  # 2 -> 1, 2 -> 2, each with the same global batch (1 -> 2: the slow test below)
        "2-to-1": (sharded, [sys.executable], "8"),
        "2-to-2": (sharded, two_ranks(29564), "4"),
    }
    for case, (source, prefix, batch) in cases.items():
        resumed = _resumed_at_6(source, tmp_path / case, prefix, batch)
        assert {s: resumed[s] for s in (7, 8)} == pytest.approx({s: losses[s] for s in (7, 8)}, abs=2e-5), case
    exported = tmp_path / "export"
    r = subprocess.run(
        [sys.executable, "-m", "spu_engine.cli", "export", "--run", str(sharded), "--out", str(exported), "--merge"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(exported)
    assert not any("lora" in n for n, _ in model.named_parameters())  # LoRA merged into the weights it adapts
    final = weights(sharded / "checkpoints" / "step-0000008")
    assert torch.equal(model.classifier.weight, final["classifier.weight"])


@pytest.mark.slow  # 2 more processes; the default set resumes a sharded checkpoint on one process and on two
def test_a_whole_checkpoint_resumes_on_two_ranks(models, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % ARCH["bert"])
    whole = tmp_path / "one"
    run([sys.executable, *train_args(models["bert"], "bert", whole, 8, 8, policy, "--checkpoint-every", "6")])
    resumed = _resumed_at_6(whole, tmp_path / "1-to-2", two_ranks(29568), "4")
    losses = step_losses(whole)
    assert {s: resumed[s] for s in (7, 8)} == pytest.approx({s: losses[s] for s in (7, 8)}, abs=2e-5)


def _on_two_ranks(source: str, tmp_path, port: int, *args) -> str:
    """Run the Python ``source`` as a script on two ranks with ``args``; its output, once it exited 0."""
    script = tmp_path / "two_ranks_script.py"
    script.write_text(source)
    cmd = [*two_ranks(port), str(script), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


# one rank's mask is changed behind the policy's back; the next change compares the ranks and stops the run
PERTURB = """
import os
import sys
from pathlib import Path
from spu_engine.core.policy import Change, FreezeRule, Policy
from spu_engine.loop.distributed import Distributed
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.model.sharded import local

model, data, run = sys.argv[1:4]
dist = Distributed.from_env()
config = EngineConfig(model=model, data=data, steps=8, batch_size=4, max_length=32, max_train_samples=64,
                      max_eval_samples=8, eval_every=0, lr=1e-3, warmup=0)
policy = Policy.model_validate(
    {"pruning": {"method": "magnitude", "schedule": {"start_step": 0, "end_step": 2, "every": 1, "final_sparsity": 0.5}}}
)
engine = Engine(config, policy, run if dist.is_main else None, dist=dist)
engine.checkpoints = Path(run) / "checkpoints"
for _ in range(3):
    engine.trainer.train_step()
masks = engine.runtime.method("pruning").masks
name = sorted(masks.masks)[1]
if dist.rank == 1:
    shard = local(masks.masks[name]).view(-1)
    shard[0] = 1 - shard[0]
engine.apply_change(Change(freeze=[FreezeRule(units=["embeddings"], trainable=False)]), source="console")
# one write() of the whole line: two ranks share the pipe, and print's pieces could interleave
reason = engine.control.stop.reason if engine.control.stop else None
os.write(1, f"STOPPED: {reason} | NAME: {name}\\n".encode())
engine.close()
dist.close()
os._exit(0)  # past gloo's teardown at interpreter exit, which a loaded machine once aborted ("terminate called")
"""


def test_a_rank_whose_mask_drifted_stops_the_run_naming_the_tensor(models, tmp_path):
    run = tmp_path / "run"
    out = _on_two_ranks(PERTURB, tmp_path, 29565, models["bert"], SST2, run)
    line = next(x for x in out.splitlines() if x.startswith("STOPPED:"))
    stopped, name = line.removeprefix("STOPPED: ").split(" | NAME: ")
    assert f"the pruning mask of {name} on rank 1 is no longer the one every rank decided" in stopped
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()), "checkpointed before stopping"
    errors = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"error"' in x]
    assert any(e.get("kind") == "ranks" and name in e["message"] for e in errors)


# bf16 compute under FSDP2's MixedPrecisionPolicy: a block frozen for its first forwards, then unfrozen, trains
MIXED = """
import torch
from transformers import AutoModelForSequenceClassification
from spu_engine.loop.distributed import Distributed
from spu_engine.loop.sharding import follow_trainable, shard_model
from spu_engine.model.loading import find_units
import sys

dist = Distributed.from_env()
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
block0 = model.bert.encoder.layer[0]
block0.requires_grad_(False)
shard_model(model, find_units(model), dist, "full_shard", torch.bfloat16)
optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2)
before = {n: p.full_tensor().clone() for n, p in block0.named_parameters()}
ids = torch.randint(5, 900, (4, 16), generator=torch.Generator().manual_seed(dist.rank))
for step in range(4):
    if step == 2:
        block0.requires_grad_(True)  # at a boundary: every parameter sharded
        follow_trainable(model)  # what the engine does after every change
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    if step < 2:
        assert all(p.grad is None for p in block0.parameters())
    else:
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block0.parameters())
    optimizer.step()
    optimizer.zero_grad()
    if step == 1:
        assert all(torch.equal(p.full_tensor(), before[n]) for n, p in block0.named_parameters())
assert all(p.dtype == torch.float32 for p in model.parameters()), "fp32 master weights"
moved = [n for n, p in block0.named_parameters() if not torch.equal(p.full_tensor(), before[n])]
assert len(moved) == len(before), moved
print("OK", flush=True)
dist.close()
"""


def test_bf16_compute_a_block_frozen_first_then_unfrozen_trains(models, tmp_path):
    assert "OK" in _on_two_ranks(MIXED, tmp_path, 29566, models["bert"])


@pytest.mark.slow
def test_hybrid_shard_on_two_simulated_nodes_matches_one_process(models, tmp_path):
    """Two torchrun agents on this machine as two nodes of one rank: --sharding hybrid_shard builds the 2-D mesh
    (2 nodes x 1 rank: replicated across nodes), and the run ends where one process with the global batch ends."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % ARCH["bert"])
    run_dir = tmp_path / "hybrid"
    args = [*train_args(models["bert"], "bert", run_dir, 4, 8, policy, "--sharding", "hybrid_shard")]
    launch = [
        TORCHRUN,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "29569",
    ]
    nodes = [[*launch, "--node-rank", str(node), *args] for node in (1, 0)]
    second = subprocess.Popen(nodes[0], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run(nodes[1])
        assert second.wait(120) == 0, second.communicate()[0][-3000:]
    finally:
        if second.poll() is None:
            second.kill()
    one = tmp_path / "one"
    run([sys.executable, *train_args(models["bert"], "bert", one, 8, 8, policy)])
    final = "checkpoints/step-0000008"
    assert_same_model(weights(one / final), weights(run_dir / final))


# every rank's shards fail to write (a full disk): ranks cannot wait in step with rank 0's retries, so the failed
# write is a stop every rank takes at the same boundary, exit 1, saying what was not written
FULL_DISK = """
import errno
import os
import sys
from pathlib import Path
from spu_engine.core.policy import Policy
from spu_engine.loop.distributed import Distributed
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.storage import sharded_checkpoint

model, data, run = sys.argv[1:4]


def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


sharded_checkpoint.dcp.save = full
dist = Distributed.from_env()
config = EngineConfig(model=model, data=data, steps=10, batch_size=4, max_length=32, max_train_samples=64,
                      max_eval_samples=8, eval_every=0, lr=1e-3, warmup=0, checkpoint_every=2)
engine = Engine(config, Policy(), run if dist.is_main else None, dist=dist)
engine.checkpoints = Path(run) / "checkpoints"
state = engine.run()
reason = engine.control.stop.reason if engine.control.stop else None
os.write(1, f"RANK {dist.rank}: {state} exit {engine.exit_code} step {engine.step} | {reason}\\n".encode())  # one write: ranks share the pipe
engine.close()
dist.close()
os._exit(0)
"""


def test_a_failed_sharded_write_stops_every_rank_at_one_boundary(models, tmp_path):
    run_dir = tmp_path / "run"
    out = _on_two_ranks(FULL_DISK, tmp_path, 29570, models["bert"], SST2, run_dir)
    lines = sorted(x for x in out.splitlines() if x.startswith("RANK "))
    assert len(lines) == 2
    for line in lines:  # both ranks stopped at the same step, exit 1, after the checkpoint at step 2 failed
        assert " stopped exit 1 step 3 | write failure: stopped at step 3 without a checkpoint" in line, line
    errors = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if '"error"' in x]
    assert any(e["message"].endswith("; stopping every rank") and "No space left" in e["message"] for e in errors)
