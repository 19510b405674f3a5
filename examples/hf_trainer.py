"""Train with an exported SPU policy inside a Hugging Face Trainer.

    python examples/hf_trainer.py --model minilm --data ../shared/data/sst2 --steps 40

``SPUCallback(policy)`` applies the freeze timeline, the pruning schedule and PEFT at
the Trainer's step boundaries.  Selective backprop needs the loss itself: the Trainer
subclass below returns ``controller.selective_loss`` from ``compute_loss``, which
backpropagates only the samples the policy keeps (a plain mean when it is off).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from spu_engine.core.collapse import collapse_note
from spu_engine.core.policy_files import load_policy
from spu_engine.integrations import SPUCallback, per_sample_loss
from spu_engine.model.loading import load_model, load_tokenizer, set_seed
from spu_engine.tasks import TaskOptions, get_task, infer_task

HERE = Path(__file__).resolve().parent


class SelectiveBackpropTrainer(Trainer):
    """A Trainer whose loss comes from the SPU policy (selective backprop) instead of the model's mean."""

    def __init__(self, *args, spu: SPUCallback, **kwargs) -> None:
        super().__init__(*args, callbacks=[spu], **kwargs)
        self.spu = spu

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:  # evaluation: the model's own loss and outputs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.spu.controller.selective_loss(inputs, lambda batch: per_sample_loss(model, batch))


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
    tokenizer = load_tokenizer(args.model)
    task = get_task(infer_task(args.data, args.model)).build(
        args.data, tokenizer, TaskOptions(max_length=args.max_length, max_eval_samples=args.max_eval_samples)
    )
    model = load_model(args.model, task.model_kind, num_labels=task.num_labels, tokenizer=tokenizer)
    spu = SPUCallback(load_policy(args.policy), seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=True,
            seed=args.seed,
        )
        trainer = SelectiveBackpropTrainer(
            model=model, args=training, train_dataset=task.train, data_collator=task.collate, spu=spu
        )
        trainer.train()
    print(
        f"trainable at the end: {spu.controller.trainable_count():,} of {sum(p.numel() for p in model.parameters()):,}"
    )

    model.eval()
    eval_batches = (
        {k: v.to(model.device) for k, v in task.collate(task.eval[i : i + 64]).items()}
        for i in range(0, len(task.eval), 64)
    )
    with torch.no_grad():
        metrics = task.evaluate(model, eval_batches)
    print("eval:", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    if (collapsed := collapse_note(metrics)) is not None:  # one class for every answer: the accuracy is its share
        print(collapsed)
    return metrics


if __name__ == "__main__":
    main()
