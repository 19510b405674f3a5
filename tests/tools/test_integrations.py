"""A policy runs the same in the engine, in a Hugging Face Trainer (SPUCallback) and in a plain loop (attach)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Sampler

from spu_engine.core.policy import PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.integrations import SPUCallback, attach, per_sample_loss
from spu_engine.loop.batching import BatchStream
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.loop.optimizer import NO_DECAY
from spu_engine.tasks import TaskOptions, get_task
from support import DATA, build_tiny

STEPS, BATCH = 6, 4
POLICY = {
    "freeze": [{"units": ["embeddings"], "trainable": False}, {"layers": [0], "trainable": False}],
    "timeline": [{"step": 3, "freeze": [{"layers": [0], "trainable": True}]}],
}
NO_DROPOUT = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}
SOURCES = {"lm": DATA / "wikitext2" / "wiki.valid.raw", "qa": DATA / "squad"}


def _config(task: str) -> EngineConfig:
    return EngineConfig(
        model="tiny",
        data=str(SOURCES[task]),
        task=task,
        steps=STEPS,
        batch_size=BATCH,
        max_length=32,
        max_train_samples=40,
        max_eval_samples=4,
        lr=2e-3,
        warmup=2,
        weight_decay=0.01,
        grad_clip=0.5,
        eval_every=0,
        seed=3,
    )


def _optimizer(model, config: EngineConfig):
    """The engine's optimizer and schedule: fused AdamW, no decay on biases and norms, linear warmup then decay."""
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in NO_DECAY)]
    no_decay = [p for n, p in model.named_parameters() if any(k in n for k in NO_DECAY)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        fused=True,
    )
    warm = config.warmup_steps()

    def factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (config.steps - step) / max(1, config.steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class StreamSampler(Sampler):
    """The engine's batch order: BatchStream's seeded permutations, flattened."""

    def __init__(self, size: int, seed: int, n: int) -> None:
        self.order = BatchStream(size, seed=seed).take(n)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _run_engine(task, arch, config, policy=POLICY):
    model = build_tiny(arch, task.tokenizer, config.task, **NO_DROPOUT[arch])
    changes, trainable = [], []

    def sink(_line, ev):
        if ev["type"] == "policy":
            changes.append((ev["step"], ev["trainable"]))
        elif ev["type"] == "step":
            trainable.append(ev["trainable"])

    engine = Engine(config, parse_policy(policy), model=model, tokenizer=task.tokenizer, task=task, sinks=[sink])
    assert engine.run() == "finished"
    return engine.model, changes, trainable, engine


def _run_trainer(task, arch, config, tmp_path, policy=POLICY):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_tiny(arch, task.tokenizer, config.task, **NO_DROPOUT[arch])
    trainable: list[int] = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            trainable.append(sum(p.numel() for p in model.parameters() if p.requires_grad))

    class EngineOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return StreamSampler(len(task.train), config.seed, STEPS * BATCH)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if parse_policy(policy).selective_backprop.mode == "off" or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return callback.controller.selective_loss(
                inputs, lambda b: per_sample_loss(model, b)
            )  # the recipe of examples/

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        max_grad_norm=config.grad_clip,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=config.seed,
    )
    callback = SPUCallback(parse_policy(policy), seed=config.seed)
    trainer = EngineOrderTrainer(
        model=model,
        args=args,
        train_dataset=task.train,
        data_collator=task.collate,
        optimizers=_optimizer(model, config),
        callbacks=[callback, Recorder()],
    )
    trainer.train()
    return model, [(h["step"], h["trainable"]) for h in callback.controller.history], trainable, callback.controller


def _run_plain_loop(task, arch, config, policy=POLICY):
    model = build_tiny(arch, task.tokenizer, config.task, **NO_DROPOUT[arch])
    opt, schedule = _optimizer(model, config)
    torch.manual_seed(config.seed)  # the engine seeds before methods initialise tensors (LoRA)
    ctl = attach(parse_policy(policy), model, opt, scheduler=schedule)
    stream, trainable = BatchStream(len(task.train), seed=config.seed), []
    for step in range(STEPS):
        ctl.step(step)
        batch = task.collate([task.train[i] for i in stream.take(BATCH)])
        ctl.backward(batch, lambda b: per_sample_loss(model, b))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], config.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        trainable.append(ctl.trainable_count())
    return model, [(h["step"], h["trainable"]) for h in ctl.history], trainable, ctl


@pytest.fixture(scope="module")
def tasks(tokenizer, tmp_path_factory):
    head = tmp_path_factory.mktemp("wiki") / "wiki-head.raw"  # the first 40k characters keep tokenizing quick
    head.write_text(SOURCES["lm"].read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    out = {}
    for name in ("lm", "qa"):
        config = _config(name)
        task = get_task(name).build(
            str(head) if name == "lm" else config.data,
            tokenizer,
            TaskOptions(
                max_length=config.max_length,
                max_train_samples=config.max_train_samples,
                max_eval_samples=config.max_eval_samples,
            ),
        )
        task.tokenizer = tokenizer
        out[name] = task
    return out


@pytest.fixture(scope="module")
def engine_runs(tasks):
    runs: dict[tuple, tuple] = {}

    def get(name: str, arch: str, policy=POLICY):
        key = (name, arch, id(policy))
        if key not in runs:
            runs[key] = _run_engine(tasks[name], arch, _config(name), policy)
        return runs[key]

    return get


@pytest.mark.parametrize("loop", ["trainer", "plain"])
@pytest.mark.parametrize("name,arch", [("lm", "gpt2"), ("qa", "bert")])
def test_same_policy_same_run_in_engine_trainer_and_plain_loop(tasks, engine_runs, name, arch, loop, tmp_path):
    task, config = tasks[name], _config(name)
    engine_model, engine_changes, engine_trainable, _ = engine_runs(name, arch)
    if loop == "trainer":
        model, changes, trainable, _ = _run_trainer(task, arch, config, tmp_path)
    else:
        model, changes, trainable, _ = _run_plain_loop(task, arch, config)
    assert engine_changes == changes and [s for s, _ in changes] == [3]
    assert trainable == engine_trainable and trainable[2] < trainable[3]  # block0 learns from step 3 on
    initial = build_tiny(arch, task.tokenizer, config.task, **NO_DROPOUT[arch]).state_dict()
    # Trainer's causal-LM loss (a token sum over num_items_in_batch) equals the engine's mean of per-sample means up to
    # float rounding; Adam turns that 1e-9 gradient noise into <= 1e-4 of weight, against updates of ~1e-2 (QA is exact).
    for key, value in engine_model.state_dict().items():
        assert torch.allclose(value, model.state_dict()[key], atol=1e-4, rtol=0), key
        if ".wte." in key or "embeddings" in key:
            assert torch.equal(value, initial[key]), f"{key} is frozen for the whole run"
    moved_block0 = [
        k for k in initial if (".h.0." in k or ".layer.0." in k) and not torch.equal(initial[k], model.state_dict()[k])
    ]
    assert moved_block0


METHODS_POLICY = {
    "freeze": [{"units": ["embeddings"], "trainable": False}],
    "selective_backprop": {"mode": "threshold", "threshold": 3.44},  # about half of a fresh QA head's losses
    "pruning": {
        "method": "movement",
        "targets": ["*.intermediate.dense.weight"],
        "schedule": {"start_step": 1, "end_step": 5, "every": 1, "final_sparsity": 0.5},
    },
    "timeline": [{"step": 3, "set": {"selective_backprop": {"threshold": 3.3}}}],
}


@pytest.mark.parametrize("loop", ["trainer", "plain"])
def test_selective_backprop_and_movement_pruning_run_the_same_outside_the_engine(tasks, engine_runs, loop, tmp_path):
    task, config = tasks["qa"], _config("qa")
    engine_model, _, _, engine = engine_runs("qa", "bert", METHODS_POLICY)
    run = (
        _run_trainer(task, "bert", config, tmp_path, METHODS_POLICY)
        if loop == "trainer"
        else _run_plain_loop(task, "bert", config, METHODS_POLICY)
    )
    model, controller = run[0], run[3]
    assert (
        0
        < controller.method("selective_backprop").skipped
        == engine.methods[[m.section for m in engine.methods].index("selective_backprop")].skipped
    )
    ours, theirs = (next(m for m in host.methods if m.section == "pruning") for host in (controller, engine))
    assert (
        ours.sparsity() == pytest.approx(0.5, abs=0.01) and ours.targets == theirs.targets
    )  # the schedule's 50 % at step 5
    assert all(torch.equal(ours.masks.keep(n), theirs.masks.keep(n)) for n in ours.targets)
    initial = build_tiny("bert", task.tokenizer, "qa", **NO_DROPOUT["bert"]).state_dict()
    for key, value in engine_model.state_dict().items():
        assert torch.allclose(value, model.state_dict()[key], atol=1e-6), key
    assert not torch.equal(initial["qa_outputs.weight"], model.state_dict()["qa_outputs.weight"])


def test_attach_freezes_without_grads_and_refuses_a_partial_optimizer(tokenizer):
    model = build_tiny("bert", tokenizer)
    policy = parse_policy({"freeze": [{"match": "*", "trainable": False}, {"match": "*.bias", "trainable": True}]})
    ctl = attach(policy, model, torch.optim.AdamW(model.parameters()))
    batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "labels": torch.tensor([1])}
    ctl.step(0)
    ctl.backward(batch, lambda b: per_sample_loss(model, b))
    for name, p in model.named_parameters():
        assert p.requires_grad == name.endswith(".bias")
        assert (p.grad is not None) == name.endswith(".bias"), name
    with pytest.raises(PolicyError, match="the optimizer does not hold .* parameters"):
        attach(policy, build_tiny("bert", tokenizer), torch.optim.AdamW(build_tiny("bert", tokenizer).parameters()))
    with pytest.raises(PolicyError, match="pattern 'encoder.nope.\\*' matches no parameter"):
        attach(parse_policy({"freeze": [{"match": "encoder.nope.*", "trainable": False}]}), model)
    with pytest.raises(PolicyError, match="no-such-policy.yaml: no such policy file"):
        SPUCallback("no-such-policy.yaml")


def test_soft_movement_pruning_follows_its_ramp_in_a_plain_loop(tokenizer):
    """Soft movement's threshold follows the step the loop is at (it once read the engine's step counter, which the
    controller does not have, and raised)."""
    model = build_tiny("bert", tokenizer)
    opt = torch.optim.AdamW(model.parameters())
    policy = parse_policy(
        {
            "pruning": {
                "method": "soft_movement",
                "schedule": {"start_step": 0, "end_step": 4, "every": 1, "final_sparsity": 0.5},
            }
        }
    )
    ctl = attach(policy, model, opt)
    batch = {"input_ids": torch.tensor([[101, 2000, 102], [101, 3000, 102]]), "labels": torch.tensor([1, 0])}
    sparsity = []
    for step in range(5):
        ctl.step(step)
        ctl.backward(batch, lambda b: per_sample_loss(model, b))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sparsity.append(ctl.method("pruning").sparsity())
    assert sparsity[-1] == pytest.approx(0.5, abs=1e-3) and sparsity[0] < sparsity[-1]
