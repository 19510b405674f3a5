"""Knowledge distillation: the task loss mixed with a KL to a teacher's answers."""

from spu_engine.methods.distillation.settings import Distillation
from spu_engine.methods.spec import ConsoleField, MethodSpec, SectionSpec

SPEC = MethodSpec(
    "distillation",
    SectionSpec(
        "distillation",
        Distillation,
        title="Distillation",
        fields=(
            ConsoleField("enabled", "kd-enabled", "enabled"),
            ConsoleField("teacher", "kd-teacher", "teacher"),
            ConsoleField("alpha", "kd-alpha", "alpha"),
            ConsoleField("temperature", "kd-temperature", "temperature"),
        ),
    ),
    "spu_engine.methods.distillation.method:Distillation",
)
