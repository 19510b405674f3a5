"""Knowledge distillation: the task loss mixed with a KL to a teacher's answers."""

from ..spec import ConsoleField, MethodSpec, SectionSpec
from .settings import Distillation

SPEC = MethodSpec(
    "distillation",
    SectionSpec(
        "distillation", Distillation, title="Distillation",
        fields=(
            ConsoleField("enabled", "kd-enabled", "enabled"),
            ConsoleField("teacher", "kd-teacher", "teacher"),
            ConsoleField("alpha", "kd-alpha", "alpha"),
            ConsoleField("temperature", "kd-temperature", "temperature"),
        ),
    ),
    "spu_engine.methods.distillation.method:Distillation",
)
