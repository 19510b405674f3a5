"""What several test files share: tiny models, data paths, a recorded run, a scripted link, waiting helpers."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import torch

from spu_engine.core.policy import Policy, TimelineEntry
from spu_engine.core.policy_files import parse_policy
from spu_engine.core.runs import read_history
from spu_engine.loop.engine import EngineConfig
from spu_engine.methods.pruning.method import PruningMethod
from spu_tui.link import Inbox, Link
from spu_tui.widgets.unit_tree import UnitTree

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


DATA = SHARED / "data"


SST2 = DATA / "sst2"
GSM8K = DATA / "gsm8k"


WIKI = DATA / "wikitext2" / "wiki.valid.raw"


TEST_DEVICE = os.environ.get("SPU_TEST_DEVICE", "auto")  # bench/gpu.sh runs the engine tests with cuda


def tiny_config(arch: str, **overrides):
    """A tiny from-config model configuration of a given architecture."""
    from transformers import AutoConfig

    base = {
        "bert": {
            "vocab_size": 1000,
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
        },
        "distilbert": {
            "vocab_size": 1000,
            "dim": 32,
            "n_layers": 4,
            "n_heads": 4,
            "hidden_dim": 64,
            "max_position_embeddings": 128,
        },
        "roberta": {
            "vocab_size": 1000,
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 130,
        },
        "gpt2": {"vocab_size": 1000, "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128},
        "llama": {
            "vocab_size": 1000,
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
        },
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
    auto = {
        "classification": AutoModelForSequenceClassification,
        "qa": AutoModelForQuestionAnswering,
        "lm": AutoModelForCausalLM,
    }[task]
    if task == "classification":
        cfg.num_labels = 2
    return auto.from_config(cfg)


def small_sst2(folder):
    """The first rows of the real SST-2 files: enough to train a tiny model for a few steps."""
    for name, rows in (("train.tsv", 300), ("dev.tsv", 40)):
        lines = (SST2 / name).read_text(encoding="utf-8").splitlines(keepends=True)[: rows + 1]
        (folder / name).write_text("".join(lines), encoding="utf-8")
    return folder


def record_run(tmp_path_factory, tokenizer, name: str, timeline: list, data=None, **config) -> tuple:
    """A finished tiny-BERT run on ``data`` (default: a slice of SST-2) with ``timeline`` changes (step, change): its folder and history,
    as attach reads them."""
    from spu_engine.loop.engine import Engine
    from spu_engine.tasks import TaskOptions
    from spu_engine.tasks.classification import ClassificationTask

    run_dir = tmp_path_factory.mktemp(name)
    data = data or small_sst2(tmp_path_factory.mktemp("sst2"))
    task = ClassificationTask.build(
        str(data), tokenizer, TaskOptions(max_length=32, max_train_samples=256, max_eval_samples=32)
    )
    config = EngineConfig(model="tiny", data=str(data), **{"batch_size": 8, "lr": 1e-3, "warmup": 0, **config})
    policy = Policy(timeline=[TimelineEntry(step=step, **change.model_dump()) for step, change in timeline])
    engine = Engine(config, policy, run_dir, model=build_tiny("bert", tokenizer), tokenizer=tokenizer, task=task)
    engine.run()
    engine.close()
    return run_dir, read_history(run_dir)


def screen_lines(app) -> list[str]:
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(
        width=width, height=height, file=io.StringIO(), record=True, force_terminal=True, legacy_windows=False
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text().splitlines()


def assert_inside(app, *selectors: str) -> None:
    screen = app.screen.region
    for selector in selectors:
        widget = app.screen.query_one(selector)
        region = widget.region
        assert region.area > 0, f"{selector} is not visible"
        assert screen.contains_region(region), f"{selector} at {region} leaves the {screen.size} screen"


def scripted_hello(units: list[str], **extra) -> dict:
    """The engine's hello for a scripted console: each unit two tensors, ``<unit>.w`` and ``<unit>.b``."""
    return {
        "type": "hello",
        "t": 1.0,
        "state": "training",
        "step": 0,
        "total_steps": 100,
        "config": {"model": "tiny"},
        "units": [
            {"name": u, "numel": 8, "params": [{"name": f"{u}.w", "numel": 6}, {"name": f"{u}.b", "numel": 2}]}
            for u in units
        ],
        **extra,
    }


class ScriptedLink(Link):
    """Stands in for the engine socket: records commands, delivers events the test writes."""

    connected = True  # a scripted engine is always there

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.inbox: Inbox | None = None

    def connect(self, target, timeout: float = 60.0) -> None:
        self.inbox = Inbox(target)

    def send(self, cmd: str, **fields) -> str:
        self.sent.append((cmd, fields))
        return f"c{len(self.sent)}"

    def deliver(self, *events: dict) -> None:
        assert self.inbox is not None, "the console has not connected yet"
        for ev in events:
            self.inbox.put(ev)

    def drain(self) -> list[dict]:
        return self.inbox.drain() if self.inbox is not None else []

    def close(self) -> None:
        pass

    def changes(self) -> list[dict]:
        """The change commands sent, as the protocol carries them."""
        return [fields["change"] for cmd, fields in self.sent if cmd == "change"]


async def type_into(pilot, app, widget_id: str, text: str) -> None:
    """Focus a field (which selects its text, as for a user tabbing in) and type over it."""
    app.query_one(UnitTree).focus()
    app.query_one(f"#{widget_id}").focus()
    await pilot.pause(0.05)
    await pilot.press(*text)
    await pilot.pause(0.1)


async def wait_for(pilot, predicate, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.1)


def events_of(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_history(run_dir) if e.get("type") == kind]


def collapse_to_class_0(engine) -> list[dict]:
    """Make the head answer class 0 whatever it reads; returns the list the engine's log events will go to."""
    logs: list[dict] = []
    engine.sinks.append(lambda _line, ev: logs.append(ev) if ev["type"] == "log" else None)
    with torch.no_grad():
        engine.model.classifier.weight.zero_()
        engine.model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    return logs


TARGETS = ["*.attention.*.weight", "*.intermediate.dense.weight", "*.output.dense.weight"]


def pruning_policy(method="magnitude", **over):
    section = {
        "method": method,
        "targets": TARGETS,
        "schedule": {"start_step": 0, "end_step": 4, "every": 2, "final_sparsity": 0.7},
        "imp": {"rounds": 2, "round_steps": 2, "fraction": 0.3, "reset": "pretrained"},
        "movement": {"score_lr": 0.05, "warmup": 0.0},  # the schedule alone; the warm-up has its own tests
    }
    for key, value in over.items():
        if isinstance(value, dict):
            section[key] = {**section.get(key, {}), **value}
        else:
            section[key] = value
    return parse_policy({"pruning": section})


def method_of(engine) -> PruningMethod:
    return next(m for m in engine.methods if isinstance(m, PruningMethod))


def run_steps(engine, n):
    for _ in range(n):
        engine.train_step()


ROOT = Path(__file__).resolve().parents[1]  # the repository


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports, read from the source with ``ast`` (a name imported from a
    package that is a submodule counts as it)."""
    files = {}
    for path in (p for package in packages for p in (ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        files[".".join(parts)] = (path, is_package)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, (path, is_package) in files.items():
        here = module.split(".") if is_package else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = (
                    ".".join([*here[: len(here) - node.level + 1], node.module or ""]).strip(".")
                    if node.level
                    else node.module or ""
                )
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def starts_an_engine(args) -> bool:
    """``python -m spu_engine...`` (the engine, spu train) or torchrun: what the ``process`` marker is for."""
    argv = [str(a) for a in (args if isinstance(args, (list, tuple)) else str(args).split())]
    module = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"]
    return any(m.startswith(("spu_engine", "torch.distributed")) for m in module) or any("torchrun" in a for a in argv)
