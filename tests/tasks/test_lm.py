"""Causal LM: blocks of the WikiText-2 text, perplexity by hand on a tiny GPT-2, training with freezing."""

from __future__ import annotations

import math

import pytest
import torch

from spu_engine.core.data import DataError
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions, lm
from spu_engine.tasks.lm import LMTask
from support import DATA, build_tiny

WIKI = DATA / "wikitext2" / "wiki.valid.raw"


def token_ids(text: str, tokenizer) -> list[int]:
    """The reference: the whole text's ids, tokenized a line at a time in memory (no special tokens)."""
    lines = text.splitlines(keepends=True)
    return [i for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for i in ids]


@pytest.fixture(scope="module")
def wiki_ids(tokenizer):
    return token_ids(WIKI.read_text(encoding="utf-8"), tokenizer)


def test_blocks_are_the_concatenated_text(tokenizer, wiki_ids):
    task = LMTask.build(str(WIKI), tokenizer, TaskOptions(max_length=64, eval_split=0))
    assert len(task.train) == len(wiki_ids) // 64
    assert all(len(f["input_ids"]) == 64 and f["labels"] == f["input_ids"] for f in task.train)
    assert [i for f in task.train for i in f["input_ids"]] == wiki_ids[: 64 * len(task.train)]
    assert task.eval == task.train  # one file and --eval-split 0: eval on the same text, and the run says so
    assert "--eval-split is 0: evaluation runs on the training data" in task.notes[0]
    assert tokenizer.decode(task.train[0]["input_ids"]).startswith("= homarus gammarus =")


def test_eval_split_holds_out_the_tail(tokenizer, wiki_ids):
    task = LMTask.build(str(WIKI), tokenizer, TaskOptions(max_length=64))  # one file: 0.1 held out unasked
    assert task.notes[0].startswith(f"{WIKI} has no eval split: the last 10% of the text")
    cut = int(len(wiki_ids) * 0.9)
    assert [i for f in task.train for i in f["input_ids"]] == wiki_ids[: 64 * len(task.train)]
    assert [i for f in task.eval for i in f["input_ids"]] == wiki_ids[cut : cut + 64 * len(task.eval)]
    assert 64 * len(task.train) <= cut


def test_perplexity_is_exp_of_the_mean_token_loss(tokenizer, monkeypatch):
    task = LMTask.build(str(WIKI), tokenizer, TaskOptions(max_length=32, max_eval_samples=6))
    model = build_tiny("gpt2", tokenizer, "lm").eval()
    ids = torch.tensor([f["input_ids"] for f in task.eval])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)
        token_nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [6, 31]
        metrics = task.evaluate(model, [task.collate(task.eval[:4]), task.collate(task.eval[4:])])
        per_sample = task.per_sample_loss(model, task.collate(task.eval))
        hf_loss = model(input_ids=ids[:1], labels=ids[:1]).loss
    assert metrics["eval_tokens"] == 6 * 31
    assert metrics["eval_loss"] == pytest.approx(token_nll.mean().item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(token_nll.mean().item()), rel=1e-5)
    assert torch.allclose(per_sample, token_nll.mean(1), rtol=1e-5)
    assert per_sample[0].item() == pytest.approx(hf_loss.item(), rel=1e-5)
    monkeypatch.setattr(lm, "LOGITS_BUDGET", 1)  # a big eval batch is cut into single rows: same figures
    with torch.no_grad():
        assert task.evaluate(model, [task.collate(task.eval)]) == pytest.approx(metrics, rel=1e-6)


def test_padded_labels_are_ignored(tokenizer):
    task = LMTask.build(str(WIKI), tokenizer, TaskOptions(max_length=16, max_train_samples=2))
    model = build_tiny("gpt2", tokenizer, "lm").eval()
    short = {"input_ids": task.train[1]["input_ids"][:10], "labels": task.train[1]["labels"][:10]}
    with torch.no_grad():
        padded = task.per_sample_loss(model, task.collate([task.train[0], short]))[1]
        alone = task.per_sample_loss(model, task.collate([short]))[0]
    assert padded.item() == pytest.approx(alone.item(), rel=1e-5)


def test_too_little_text_is_a_clear_error(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words\n")
    with pytest.raises(DataError, match="fewer than one block of --max-length 64"):
        LMTask.build(str(path), tokenizer, TaskOptions(max_length=64))
    table = tmp_path / "train.csv"
    table.write_text("body\nhello world\n")
    with pytest.raises(DataError, match="no column 'text' \\(set by --text-column\\); columns are: body"):
        LMTask.build(str(table), tokenizer, TaskOptions(max_length=8))
    assert LMTask.build(str(table), tokenizer, TaskOptions(max_length=2, text_column="body", eval_split=0)).train


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_trains_with_frozen_prefix(tokenizer, arch):
    config = EngineConfig(
        model="tiny",
        data=str(WIKI),
        steps=3,
        batch_size=4,
        max_length=32,
        max_train_samples=32,
        max_eval_samples=8,
        eval_every=0,
        warmup=0,
        lr=1e-3,
    )
    assert config.task == "lm"
    policy = parse_policy(
        {"freeze": [{"units": ["embeddings"], "trainable": False}, {"layers": [0], "trainable": False}]}
    )
    engine = Engine(config, policy, model=build_tiny(arch, tokenizer, "lm"), tokenizer=tokenizer)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    first = engine.evaluate()
    assert engine.run() == "finished"
    for name, p in engine.model.named_parameters():
        if engine.units.unit_of[name] in ("embeddings", "block0"):
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    last = engine.evaluate()
    assert last["perplexity"] == pytest.approx(math.exp(last["eval_loss"]))
    assert last["eval_loss"] < first["eval_loss"]


def test_blocks_longer_than_the_model_positions_are_refused_before_training(tokenizer):
    config = EngineConfig(
        model="tiny", data=str(WIKI), steps=1, max_length=256, max_train_samples=4, max_eval_samples=2
    )
    with pytest.raises(
        DataError, match="sequences of 256 tokens do not fit this model's 128 positions; use --max-length 128 or less"
    ):
        Engine(config, model=build_tiny("gpt2", tokenizer, "lm"), tokenizer=tokenizer)


def test_an_encoder_only_model_is_refused_for_lm_naming_its_type_and_what_to_use(tokenizer):
    config = EngineConfig(model="tiny", data=str(WIKI), steps=1, max_length=32, max_train_samples=4, max_eval_samples=2)
    with pytest.raises(DataError) as refused:
        Engine(config, model=build_tiny("bert", tokenizer, "lm"), tokenizer=tokenizer)
    message = str(refused.value)
    assert message.startswith("--task lm: the model is a bert, an encoder-only (bidirectional) model")
    assert "Use a decoder-only model (GPT-2, Llama" in message and "--task classification or qa" in message
