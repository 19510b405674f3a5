"""Pooling as a run setting: the default read from the checkpoint's folder, the setting over it, and mean pooling's
logits computed by hand on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.checkpoint_pooling import checkpoint_pooling
from spu_engine.core.config import RunSettings, recorded
from spu_engine.core.policy import PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.model.pooling import PoolingError, mean_pool, pooling_of, use_pooling
from spu_engine.tasks.base import model_inputs
from support import SST2, build_tiny, tiny_config


def sentence_transformers_folder(folder, mode: str):
    """A tiny BERT folder laid out as sentence-transformers saves one: modules.json naming its Pooling module."""
    folder.mkdir()
    tiny_config("bert").save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": mode == "cls"}
    pooling["pooling_mode_mean_tokens"] = mode == "mean"
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_the_pooling_is_read_from_a_sentence_transformers_folder(mode, tmp_path):
    folder = sentence_transformers_folder(tmp_path / "st", mode)
    own, why = checkpoint_pooling(str(folder))
    assert own == mode and f"pooling_mode_{'mean_tokens' if mode == 'mean' else 'cls_token'}: true" in why
    assert RunSettings(model=str(folder), data=str(SST2)).pooling == mode


def test_the_offline_minilm_pools_by_mean_and_a_plain_bert_folder_by_cls(tiny_model_dir):
    assert RunSettings(model="minilm", data=str(SST2)).pooling == "mean"
    assert RunSettings(model=str(tiny_model_dir), data=str(SST2)).pooling == "cls"
    assert "names no pooling of its own" in checkpoint_pooling(str(tiny_model_dir))[1]


def test_a_hub_id_reads_its_snapshot_in_the_local_cache(tmp_path, monkeypatch):
    """No download: the hub cache's snapshot of the repo says the pooling; a repo not cached is cls."""
    from huggingface_hub import constants

    repo = tmp_path / "models--someone--st-model"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    sentence_transformers_folder(snapshot, "mean")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert checkpoint_pooling("someone/st-model")[0] == "mean"
    assert checkpoint_pooling("someone/not-cached")[0] == "cls"


def test_the_run_setting_overrides_the_checkpoints_pooling(tiny_model_dir):
    run = parse_policy({"run": {"model": "minilm", "data": str(SST2), "pooling": "cls"}}).run
    assert run.pooling == "cls"
    run = parse_policy({"run": {"model": str(tiny_model_dir), "data": str(SST2), "pooling": "mean"}}).run
    assert run.pooling == "mean" and "pooling" in run.model_fields_set
    defaulted = parse_policy({"run": {"model": "minilm", "data": str(SST2)}}).run
    assert defaulted.pooling == "mean" and "pooling" not in defaulted.model_fields_set  # another --model picks its own
    # a run recorded before the setting existed trained through [CLS]
    assert recorded({"task": "classification", "model": "minilm"})["pooling"] == "cls"


def test_a_bad_pooling_names_the_key_and_the_choices(tiny_model_dir):
    with pytest.raises(PolicyError, match=r"pooling.*'avg' is not a pooling; choose one of cls \| mean"):
        parse_policy({"run": {"data": str(SST2), "pooling": "avg"}})
    with pytest.raises(PolicyError, match="pooling: --pooling is for classification; this run's task is lm"):
        parse_policy({"run": {"data": str(SST2.parent / "wikitext2"), "task": "lm", "pooling": "mean"}})
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(SST2), "--pooling", "max"])
    assert result.exit_code == 2 and "--pooling: 'max' is not a pooling; choose one of cls | mean" in result.output
    assert "Traceback" not in result.output


def test_train_help_says_the_default():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    assert "--pooling" in result.output and "the offline MiniLM says mean" in result.output


def batch_with_padding(tokenizer, model):
    rows = tokenizer(["a long sentence with several words in it", "short"], padding=True, return_tensors="pt")
    assert rows["attention_mask"][1].sum() < rows["attention_mask"].shape[1]  # the second row is padded
    return {k: v for k, v in rows.items() if k in ("input_ids", "attention_mask")}


def hand_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([hidden[i, mask[i].bool()].mean(dim=0) for i in range(len(hidden))])


@torch.no_grad()
def test_bert_mean_pooling_feeds_the_token_mean_to_the_classifier_past_the_pooler(tokenizer):
    plain = build_tiny("bert", tokenizer).eval()
    pooled = mean_pool(copy.deepcopy(plain))
    batch = batch_with_padding(tokenizer, plain)
    hidden = plain.bert(**batch).last_hidden_state
    want = plain.classifier(hand_mean(hidden, batch["attention_mask"]))
    assert torch.allclose(pooled(**batch).logits, want, atol=1e-6)
    assert not torch.allclose(plain(**batch).logits, want, atol=1e-3)  # [CLS] through the pooler differs
    padded = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    assert torch.allclose(pooled(**padded).logits, pooled(**batch).logits, atol=1e-6)  # padding plays no part
    for mask in (batch["attention_mask"][:, None, None, :].bool(), model_inputs(pooled, batch)["attention_mask"]):
        assert torch.allclose(pooled(**dict(batch, attention_mask=mask)).logits, want, atol=1e-6)  # the 4-D forms
    additive = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    assert torch.allclose(pooled(**dict(batch, attention_mask=additive)).logits, want, atol=1e-6)


HEADS = {  # the stock head of each encoder without a pooler, by hand, on the pooled vector
    "distilbert": lambda model, mean: model.classifier(torch.relu(model.pre_classifier(mean))),
    "roberta": lambda model, mean: model.classifier(mean[:, None, :]),  # its head reads position 0: dense, tanh, out
}


@pytest.mark.parametrize("arch", sorted(HEADS))
@torch.no_grad()
def test_an_encoder_without_a_pooler_gets_the_mean_where_its_head_reads_cls(arch, tokenizer):
    plain = build_tiny(arch, tokenizer).eval()
    pooled = mean_pool(copy.deepcopy(plain))
    batch = batch_with_padding(tokenizer, plain)
    mean = hand_mean(plain.base_model(**batch).last_hidden_state, batch["attention_mask"])
    assert torch.allclose(pooled(**batch).logits, HEADS[arch](plain, mean), atol=1e-6)


def test_mean_pooling_is_applied_once_kept_by_copies_and_undone_by_cls(tokenizer):
    model = mean_pool(mean_pool(build_tiny("bert", tokenizer)))
    assert len(model.bert._forward_hooks) == 1 and model.config.spu_pooling == "mean"
    assert pooling_of(copy.deepcopy(model)) == "mean"
    use_pooling(model, "cls")
    assert pooling_of(model) == "cls" and not hasattr(model.config, "spu_pooling")


def test_a_decoder_classifier_refuses_mean_pooling(tokenizer):
    with pytest.raises(PoolingError, match="classifies from its last token: use pooling: cls"):
        mean_pool(build_tiny("gpt2", tokenizer))
