"""Selective backprop (Jiang et al. 2019): backward only on the samples with a high loss."""

from spu_engine.methods.selective_backprop.settings import SelectiveBackprop
from spu_engine.methods.spec import ConsoleField, MethodSpec, SectionSpec

SPEC = MethodSpec(
    "selective_backprop",
    SectionSpec(
        "selective_backprop",
        SelectiveBackprop,
        title="Selective backprop",
        fields=(
            ConsoleField("mode", "sb-mode", "mode"),
            ConsoleField("threshold", "sb-threshold", "threshold"),
            ConsoleField("keep", "sb-keep", "keep"),
        ),
    ),
    "spu_engine.methods.selective_backprop.method:SelectiveBackprop",
)
