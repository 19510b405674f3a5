"""The rows of ``bench/fidelity.py``: one method each, the policy it runs, its learning rate and the paper claim it
is evidence for (the setup every row shares is in fidelity.py's docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field

FROZEN_EMBEDDINGS = {"units": ["embeddings"], "trainable": False}
SCHEDULE = {"start_step": 100, "end_step": 900, "every": 10}
MOONSHOT = {
    "freeze": [{"layers": [0, 1, 2], "trainable": False}],
    "selective_backprop": {"mode": "percentile", "keep": 0.5},
}  # examples/policies/moonshot.yaml
DISTILL = {"enabled": True, "alpha": 0.9, "temperature": 2.0}  # teacher: the full row's model


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    policy: dict
    lr: float
    checks: str  # the paper claim this row is evidence for
    distill: bool = False
    extra: dict = field(default_factory=dict)  # engine config overrides

    @property
    def pooling(self) -> str:
        """What the classifier sees: [CLS] unless the row says mean (the rows before pooling was a setting pooled
        [CLS], so ``cls`` keeps them comparable; MiniLM itself was trained to mean-pool)."""
        return self.extra.get("pooling", "cls")


def pruning(method: str, sparsity: float, **movement) -> dict:
    """As the reference ranks: magnitude and movement keep the top of each matrix (its TopK and magnitude binarizers work
    per weight matrix); soft movement's one threshold on sigmoid(score) holds for all of them."""
    scope = "global" if method == "soft_movement" else "per_layer"
    return {
        "pruning": {
            "method": method,
            "scope": scope,
            "schedule": {**SCHEDULE, "final_sparsity": sparsity},
            "movement": {"score_lr": 1e-2, **movement},
        }
    }


ROW_LIST = [
    Row("full", "full fine-tuning", {}, 1e-4, "the reference every claim compares with"),
    Row(
        "prefix",
        "frozen prefix (blocks 0-2)",
        {"freeze": [{"layers": [0, 1, 2], "trainable": False}]},
        1e-4,
        "freezing the lower half of the blocks costs little accuracy (Lee et al. 2019)",
    ),
    Row(
        "bitfit",
        "BitFit",
        {"peft": {"method": "bitfit"}},
        1e-3,
        "biases alone come close to full fine-tuning (Ben Zaken et al. 2022)",
    ),
    Row(
        "adapter",
        "Houlsby adapters (64)",
        {"peft": {"method": "adapter", "size": 64}},
        1e-3,
        "adapters come within 0.4 points of full fine-tuning on GLUE (Houlsby et al. 2019)",
    ),
    Row(
        "ia3",
        "(IA)^3",
        {"peft": {"method": "ia3"}},
        3e-3,
        "rescaling vectors alone compete with full fine-tuning (Liu et al. 2022)",
    ),
    Row(
        "lora",
        "LoRA (r 8, alpha 16)",
        {"peft": {"method": "lora", "r": 8, "alpha": 16}},
        5e-4,
        "LoRA matches full fine-tuning on GLUE (Hu et al. 2021)",
    ),
    Row(
        "sb",
        "selective backprop (keep 0.5)",
        {"selective_backprop": {"mode": "percentile", "keep": 0.5}},
        1e-4,
        "reaches the baseline's accuracy in less wall time (Jiang et al. 2019)",
    ),
    Row(
        "lisa",
        "LISA (2 of 6 blocks, resampled every 50 steps)",
        {"auto_freeze": {"method": "lisa", "interval": 50, "n_layers": 2, "embeddings": False, "head": True}},
        1e-4,
        "training a few blocks sampled at random matches full fine-tuning at lower cost (Pan et al. 2024)",
    ),
    Row(
        "autofreeze",
        "AutoFreeze (checked every 100 steps)",
        {"auto_freeze": {"method": "autofreeze", "interval": 100}},
        1e-4,
        "freezing the front blocks once their gradient norm settles keeps accuracy and saves time (Liu et al. 2021)",
        extra={"stats_every": 10},
    ),
    Row(
        "dora",
        "DoRA (r 8, alpha 16)",
        {"peft": {"method": "lora", "r": 8, "alpha": 16, "use_dora": True}},
        5e-4,
        "DoRA matches or beats LoRA at the same rank (Liu et al. 2024)",
    ),
    Row(
        "adalora",
        "AdaLoRA (rank 12 to 8)",
        {"peft": {"method": "adalora", "init_r": 12, "target_r": 8, "tinit": 100, "tfinal": 200}},
        5e-4,
        "AdaLoRA's budgeted ranks match LoRA at the same budget (Zhang et al. 2023)",
    ),
    Row(
        "moonshot",
        "moonshot: blocks 0-2 frozen + selective backprop keep 0.5",
        MOONSHOT,
        1e-4,
        "within 0.5 point of full fine-tuning in at most half its wall time (issue 16's moonshot)",
    ),
    Row(
        "wus",
        "weight-update skipping",
        {"weight_update_skipping": {"enabled": True, "start_phase": "full", "patience": 1}},
        1e-4,
        "switching to bias-only updates once eval loss stalls keeps accuracy at lower cost",
    ),
    Row(
        "full-mean",
        "full fine-tuning, mean pooling",
        {},
        1e-4,
        "the reference the mean-pooling rows compare with (and their distillation teacher)",
        extra={"pooling": "mean"},
    ),
    *(
        Row(
            f"{m}{int(s * 100)}{'-kd' if kd else ''}{'-mean' if mean else ''}",
            f"{name} {int(s * 100)} %{' + distillation' if kd else ''}{', mean pooling' if mean else ''}",
            pruning(m, s, **({"l1": 400.0} if m == "soft_movement" else {})),
            1e-4,
            claim,
            distill=kd,
            extra={"pooling": "mean"} if mean else {},
        )
        for mean in (False, True)
        for s in (0.9, 0.97)
        for m, name, claim in (
            ("magnitude", "magnitude", "the baseline movement pruning is measured against (Sanh et al. 2020)"),
            ("movement", "movement", "movement beats magnitude at high sparsity (Sanh et al. 2020)"),
            ("soft_movement", "soft movement", "soft movement beats movement at high sparsity (Sanh et al. 2020)"),
        )
        for kd in (False, True)
    ),
]
ROW_BY_KEY = {r.key: r for r in ROW_LIST}
