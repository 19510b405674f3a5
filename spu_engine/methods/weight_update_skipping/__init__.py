"""Weight-update skipping (Safayanikoo & Akturk 2020): bias-only phases that end when eval loss stops improving."""

from spu_engine.methods.spec import ConsoleField, MethodSpec, SectionSpec
from spu_engine.methods.weight_update_skipping.settings import WeightUpdateSkipping, phase_line

SPEC = MethodSpec(
    "weight_update_skipping",
    SectionSpec(
        "weight_update_skipping",
        WeightUpdateSkipping,
        title="Weight-update skipping",
        fields=(
            ConsoleField("enabled", "wus-enabled", "enabled"),
            ConsoleField("start_phase", "wus-start", "start phase"),
            ConsoleField("patience", "wus-patience", "patience"),
        ),
        status=phase_line,
    ),
    "spu_engine.methods.weight_update_skipping.method:WeightUpdateSkipping",
)
