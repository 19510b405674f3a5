"""--compile: the model compiled in place trains as the uncompiled one does; a live change recompiles once and is said
in the step event and the log, and the what-if says it before, warning when a change would pass the recompile limit.

On CPU these compile with ``aot_eager`` (``SPU_COMPILE_BACKEND``): dynamo traces the model and AOTAutograd builds its
forward and backward graphs, as under inductor, without generating C++ (a minute or two on two cores); the inductor
test is marked slow.  Inputs are 8 tokens long, so no second input size recompiles with dynamic sizes in between, and
the models have two blocks: each compile takes a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, FreezeRule, Policy
from spu_engine.loop import compiled
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask
from spu_tui.run_model import RunModel
from support import SST2, build_tiny

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def task(tokenizer):
    return ClassificationTask.build(
        str(SST2), tokenizer, TaskOptions(max_length=8, max_train_samples=256, max_eval_samples=16)
    )


@pytest.fixture
def engine(tokenizer, task, monkeypatch):
    """A tiny model on 8-token SST-2 batches; ``compile``: through --compile, with ``aot_eager`` unless given."""
    monkeypatch.setenv(compiled.BACKEND_ENV, "aot_eager")
    made: list[Engine] = []

    def make(arch="bert", policy=None, *, model=None, **cfg):
        config = EngineConfig(
            model="tiny",
            data=str(SST2),
            **{"steps": 20, "batch_size": 8, "eval_every": 0, "stats_every": 100, "eval_batch_size": 16, **cfg},
            lr=1e-3,
            warmup=0,
            device="cpu",
        )
        model = model or build_tiny(arch, tokenizer, num_hidden_layers=2)  # half the tracing of four
        made.append(Engine(config, policy, model=model, tokenizer=tokenizer, task=task))
        said: list[dict] = []
        made[-1].sinks.append(lambda _line, ev: said.append(ev))
        made[-1].said = said
        return made[-1]

    yield make
    for e in made:
        e.close()


def steps(engine, n):
    return [engine.train_step()["loss"] for _ in range(n)]


def uncompiled(engine, script, *args, **cfg) -> list[float]:
    """The losses of the uncompiled run of ``script`` (steps, and changes between them), run alone: each engine seeds
    torch's generator when built, so two runs interleaved would draw each other's dropout masks."""
    e, losses = engine(*args, **cfg), []
    for item in script:
        losses += steps(e, item) if isinstance(item, int) else (e.apply_change(item, "test") or [])
    return losses


def said(engine, kind):
    return [e for e in engine.said if e["type"] == kind]


def freeze(*layers, trainable=False, units=None):
    return Change(freeze=[FreezeRule(layers=list(layers) or None, units=units, trainable=trainable)])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_compiled_model_trains_as_the_uncompiled_one(engine, arch):
    expected = uncompiled(engine, [3], arch)
    fast = engine(arch, compile=True)
    names = list(fast.model.state_dict())
    assert steps(fast, 3) == pytest.approx(expected, abs=TOLERANCE)
    assert fast.model._compiled_call_impl is not None and list(fast.model.state_dict()) == names  # in place
    first = said(fast, "step")[0]
    assert (first["compiled"], first["compiles"], first["compile_limit"]) == ("compiled", 1, compiled.RECOMPILE_LIMIT)
    assert all(e.get("compiled") is None for e in said(fast, "step")[1:])
    assert any(
        "step 1: compiled the model for training (1 of the recompile limit" in e["message"] for e in said(fast, "log")
    )
    assert fast.replayable_policy().run.compile is True  # an exported policy replays compiled


def test_a_live_freeze_recompiles_once_said_before_and_after(engine):
    expected = uncompiled(engine, [2, freeze(0), 2])
    fast = engine(compile=True)
    losses = steps(fast, 2)
    notes = fast.preview(freeze(0))["notes"]
    assert "compiled: this change recompiles the model once (1 of the recompile limit 32 so far)" in notes
    assert not [n for n in fast.preview(Change())["notes"] if n.startswith("compiled")]  # nothing changes: no note
    fast.apply_change(freeze(0), "test")
    losses += steps(fast, 2)
    assert losses == pytest.approx(expected, abs=TOLERANCE)
    events = said(fast, "step")
    assert [(e["step"], e.get("compiled"), e.get("compiles")) for e in events if e.get("compiled")] == [
        (1, "compiled", 1),
        (3, "recompiled", 2),  # once, on the first step after the change
    ]
    assert any(
        e["message"]
        == "step 3: recompiled the model for training after the change to what trains (2 of the recompile limit 32)"
        for e in said(fast, "log")
    )
    back = fast.preview(freeze(0, trainable=True))["notes"]  # the first trainable set: compiled already
    assert "compiled: the model was compiled for this trainable set before: its compiled code is used again" in back


def test_the_what_if_warns_before_the_limit_and_past_it_the_model_runs_uncompiled(engine, monkeypatch):
    monkeypatch.setenv(compiled.LIMIT_ENV, "3")
    expected = uncompiled(engine, [1, freeze(1), 1, freeze(units=["embeddings"]), 2])
    fast = engine(compile=True)
    losses = steps(fast, 1)
    fast.evaluate()  # evaluation compiles once more: 2 of 3
    assert fast.compiled.compiles == 2
    (note,) = [n for n in fast.preview(freeze(1))["notes"] if n.startswith("compiled")]
    assert note.startswith("compiled: this change would pass torch's recompile limit (2 of 3 compiles so far; ")
    assert "once in each way the run calls it (training, evaluation), and evaluation would pass it" in note
    assert "uncompiled (eager: slower, the same results)" in note and "SPU_RECOMPILE_LIMIT" in note
    fast.apply_change(freeze(1), "test")
    losses += steps(fast, 1)  # 3 of 3
    fast.apply_change(freeze(units=["embeddings"]), "test")
    losses += steps(fast, 2)  # refused: runs eager
    assert losses == pytest.approx(expected, abs=TOLERANCE)
    assert [e.get("compiled") for e in said(fast, "step")] == ["compiled", "recompiled", "limit", None]
    assert any("recompile limit (3) is reached" in e["message"] and e["level"] == "warning" for e in said(fast, "log"))
    assert "torch's recompile limit (3) was reached at step 3" in " ".join(fast.preview(freeze(0))["notes"])


def test_lora_added_live_to_a_compiled_model_recompiles_once_and_trains_as_uncompiled(engine):
    lora = Change(set={"peft": {"method": "lora", "r": 4}})
    expected = uncompiled(engine, [2, lora, 2])
    fast = engine(compile=True)
    losses = steps(fast, 2)
    assert (
        "compiled: this change recompiles the model once (1 of the recompile limit 32 so far)"
        in fast.preview(lora)["notes"]
    )
    fast.apply_change(lora, "test")
    losses += steps(fast, 2)
    assert losses == pytest.approx(expected, abs=TOLERANCE)
    assert [e.get("compiled") for e in said(fast, "step")] == ["compiled", None, "recompiled", None]
    assert any(".lora_A." in n for n, p in fast.params.items() if p.requires_grad)


def test_a_model_compiled_with_lora_from_the_start_and_frozen_live(engine):
    policy = Policy(peft={"method": "lora", "r": 4})
    expected = uncompiled(engine, [1, freeze(0), 1], "llama", policy)
    fast = engine("llama", policy, compile=True)
    losses = steps(fast, 1)
    fast.apply_change(freeze(0), "test")
    losses += steps(fast, 1)
    assert losses == pytest.approx(expected, abs=TOLERANCE)
    assert [e.get("compiled") for e in said(fast, "step")] == ["compiled", "recompiled"]


def test_selective_backprop_switched_on_compiles_its_scoring_once(engine):
    on = Change(set={"selective_backprop": {"mode": "percentile", "keep": 0.5}})
    expected = uncompiled(engine, [1, on, 2])
    fast = engine(compile=True)
    losses = steps(fast, 1)
    assert fast.preview(on)["notes"][-1] == (
        "compiled: this change turns on selective backprop, whose scoring runs the model without gradients: it "
        "compiles once more (1 of the recompile limit 32 so far)"
    )
    fast.apply_change(on, "test")
    losses += steps(fast, 2)
    assert losses == pytest.approx(expected, abs=TOLERANCE)
    assert [e.get("compiled") for e in said(fast, "step")] == ["compiled", "recompiled", None]


def test_inductor_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(
        ValueError, match=r"--compile: torch's inductor backend needs a C\+\+ compiler .* SPU_COMPILE_BACKEND=aot_eager"
    ):
        compiled.check_backend("inductor", torch.device("cpu"))
    compiled.check_backend("aot_eager", torch.device("cpu"))  # needs nothing


def test_the_console_says_the_first_step_compiles():
    model = RunModel()
    model.apply({"type": "state", "state": "training", "step": 0})  # a replayed history: the state comes first
    model.apply({"type": "hello", "state": "training", "step": 0, "config": {"compile": True}})
    assert model.waiting.startswith("the first step: compiling the model (torch.compile")


@pytest.mark.slow
def test_inductor_trains_as_eager(engine, tokenizer, monkeypatch):
    """The real backend, generating C++ kernels (a minute or more on two cores); dropout off, since inductor draws
    its own random numbers.  Its speed is for bench/, not for a test on a shared machine."""
    monkeypatch.setenv(compiled.BACKEND_ENV, "inductor")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    expected = steps(engine(model=build_tiny("bert", tokenizer, **no_dropout)), 6)
    fast = engine(model=build_tiny("bert", tokenizer, **no_dropout), compile=True)
    assert steps(fast, 6) == pytest.approx(expected, abs=TOLERANCE)
    assert said(fast, "step")[0]["compiled"] == "compiled"


def test_gradient_checkpointing_switched_live_on_a_compiled_model(engine, tokenizer):
    """The checkpointed blocks trace through torch.utils.checkpoint: the same losses, a recompile, no error."""
    checkpointing = Change(set={"memory": {"gradient_checkpointing": True}})
    model = build_tiny("llama", tokenizer, num_hidden_layers=2)
    expected = uncompiled(engine, [2, checkpointing, 2], "llama", model=model)
    fast = engine("llama", compile=True, model=build_tiny("llama", tokenizer, num_hidden_layers=2))
    losses = steps(fast, 2)
    fast.apply_change(checkpointing, "test")
    losses += steps(fast, 2)
    assert losses == pytest.approx(expected, abs=TOLERANCE)
    assert fast.trainer.checkpointing.on
