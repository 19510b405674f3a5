"""The learning rates each PEFT method's tensors usually train at, so the what-if can say when a switch would give
them one far from it.  A live switch from full fine-tuning keeps the run's lr (5e-5 by default) unless ``peft.lr``
says otherwise, and the few tensors LoRA, adapters, (IA)³ or BitFit train barely move at a full fine-tuning rate.
Torch-free: the console may read it.

The ranges, from the methods' papers and their reference code:

- LoRA: 1e-4 to 1e-3 (Hu et al. 2021 used 2e-4 to 5e-4 on GLUE; about ten times full fine-tuning's rate,
  Schulman et al. 2025, "LoRA Without Regret");
- AdaLoRA: 1e-4 to 2e-3 (Zhang et al. 2023: 5e-4 to 1.2e-3 on GLUE);
- Houlsby adapters: 1e-4 to 1e-3 (Houlsby et al. 2019 searched {3e-5, 3e-4, 3e-3}; AdapterHub's examples 1e-4);
- (IA)³: 1e-3 to 1e-2 (Liu et al. 2022, T-Few: 3e-3);
- BitFit: 1e-4 to 1e-3 (Ben Zaken et al. 2022 searched {1e-4, 4e-4, 7e-4, 1e-3}).
"""

from __future__ import annotations

USUAL_LR: dict[str, tuple[float, float, float]] = {  # method -> (lowest, highest, a good first choice)
    "lora": (1e-4, 1e-3, 2e-4),
    "adalora": (1e-4, 2e-3, 5e-4),
    "adapter": (1e-4, 1e-3, 1e-4),
    "ia3": (1e-3, 1e-2, 3e-3),
    "bitfit": (1e-4, 1e-3, 4e-4),
}


def lr_note(method: str, lr: float | None, run_lr: float) -> str | None:
    """What-if: the peak lr the method's tensors get, its usual range, and a warning when outside it."""
    if method not in USUAL_LR:
        return None
    low, high, first = USUAL_LR[method]
    given = lr if lr is not None else run_lr
    source = "peft.lr" if lr is not None else "the run's lr; set peft.lr (the PEFT section's lr) for its own"
    note = f"{method}: its tensors train at lr {given:g} ({source}); {method}'s usual range is {low:g} to {high:g}"
    if low <= given <= high:
        return note
    side = "below" if given < low else "above"
    return f"{note}. Warning: {side} it, {'little will learn' if side == 'below' else 'training may diverge'}; try {first:g}"
