"""Train with an exported SPU policy in a hand-written PyTorch loop.

    python examples/plain_pytorch.py --model minilm --data ../shared/data/sst2 --steps 40

The loop is ordinary PyTorch; SPU adds two calls: ``ctl.step(step)`` at the start of
each step (the policy's timeline and pruning schedule) and ``ctl.backward`` (selective
backprop: only the samples the policy keeps get a backward pass).  Any of the three
tasks works: point --data at ../shared/data/squad or ../shared/data/wikitext2.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from spu_engine.core.collapse import collapse_note
from spu_engine.core.policy_files import load_policy
from spu_engine.integrations import attach, per_sample_loss
from spu_engine.model.loading import load_model, load_tokenizer, set_seed
from spu_engine.tasks import TaskOptions, get_task, infer_task

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="hub id, local HF folder, or 'minilm'")
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2"))
    p.add_argument("--policy", default=str(HERE / "policies" / "outside-the-console.yaml"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-eval-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    set_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model)
    task = get_task(infer_task(args.data, args.model)).build(
        args.data, tokenizer, TaskOptions(max_length=args.max_length, max_eval_samples=args.max_eval_samples)
    )
    model = load_model(args.model, task.model_kind, num_labels=task.num_labels, tokenizer=tokenizer).to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # over all parameters: the policy decides which train
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    ctl = attach(load_policy(args.policy), model, optimizer, scheduler=scheduler, steps=args.steps, seed=args.seed)

    loader = DataLoader(task.train, batch_size=args.batch_size, shuffle=True, collate_fn=task.collate)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    model.train()
    for step in range(args.steps):
        ctl.step(step)
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = ctl.backward(batch, lambda b: per_sample_loss(model, b))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}: loss {loss.item():.4f}, trainable {ctl.trainable_count():,}")

    model.eval()
    eval_batches = (
        {k: v.to(device) for k, v in task.collate(task.eval[i : i + 64]).items()} for i in range(0, len(task.eval), 64)
    )
    metrics = task.evaluate(model, eval_batches)
    print("eval:", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    if (collapsed := collapse_note(metrics)) is not None:  # one class for every answer: the accuracy is its share
        print(collapsed)
    return metrics


if __name__ == "__main__":
    main()
