"""Automatic freezing: LISA (Pan et al. 2024) or AutoFreeze (Liu et al. 2021) decide which blocks train."""

from spu_engine.methods.auto_freeze.settings import AutoFreeze
from spu_engine.methods.spec import ConsoleField, MethodSpec, SectionSpec, Stage

SPEC = MethodSpec(
    "auto_freeze",
    SectionSpec(
        "auto_freeze",
        AutoFreeze,
        title="Automatic freezing",
        fields=(
            ConsoleField("method", "af-method", "method"),
            ConsoleField("interval", "af-interval", "interval"),
            ConsoleField("n_layers", "af-layers", "lisa layers"),
            ConsoleField("embeddings", "af-embeddings", "emb & head"),
            ConsoleField("head", "af-head", "lisa head"),
            ConsoleField("percentile", "af-percentile", "percentile"),
            ConsoleField("allow_gaps", "af-gaps", "allow gaps"),
            ConsoleField("optimizer_state", "af-optimizer", "AdamW state"),
        ),
    ),
    "spu_engine.methods.auto_freeze.method:AutoFreeze",
    stage=Stage.DECIDES_TRAINING,
)
