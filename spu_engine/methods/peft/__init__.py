"""PEFT methods: BitFit, bottleneck adapters, IA3, LoRA (with its variants) and AdaLoRA, one module each.

All read the one ``peft`` section (its ``method`` picks which); each registers as a method of its own.
"""

from spu_engine.methods.peft.settings import Peft
from spu_engine.methods.spec import ConsoleField, MethodSpec, SectionSpec, Stage

SECTION = SectionSpec(
    "peft",
    Peft,
    title="PEFT",
    fields=(
        ConsoleField("method", "peft-method", "method"),
        ConsoleField("lr", "peft-lr", "tensor lr", unset="run's lr"),
        ConsoleField("r", "peft-r", "LoRA rank"),
        ConsoleField("alpha", "peft-alpha", "LoRA alpha"),
        ConsoleField("size", "peft-size", "adapter dim"),
        ConsoleField("use_dora", "peft-dora", "DoRA"),
        ConsoleField("use_rslora", "peft-rslora", "rsLoRA"),
        ConsoleField("init", "peft-init", "init"),
        ConsoleField("lr_ratio", "peft-ratio", "LoRA+ ratio"),
        ConsoleField("init_r", "peft-init-r", "init rank"),
        ConsoleField("target_r", "peft-target-r", "target rank"),
    ),
)


def _peft(name: str, implementation: str, ablates: str | None = None) -> MethodSpec:
    return MethodSpec(
        name,
        SECTION,
        f"spu_engine.methods.peft.{implementation}",
        stage=Stage.CHANGES_MODULES,
        switch="method",
        ablates=ablates,
    )


BITFIT = _peft("bitfit", "bitfit:BitFit")
ADAPTER = _peft("adapter", "adapter:Adapter", ablates="Houlsby adapters")  # `spu ablate` (spu_engine.tools.ablation)
IA3 = _peft("ia3", "ia3:IA3")
LORA = _peft("lora", "lora:LoRA")
ADALORA = _peft("adalora", "adalora:AdaLoRA")
