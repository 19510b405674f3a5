"""Every selective-update method, registered in one place (torch-free).

The policy builds its method sections from ``SPECS``, the engine and the own-loop
controller build their method objects from ``METHODS``, and the console reads
``section_specs()`` for its controls, so the three can never disagree.  Adding a
method: its package under ``methods/`` (``settings.py``, its code, an
``__init__.py`` with its ``SPEC``) and one line below.

``SPECS`` is in policy order (the policy's sections, its YAML and the console
follow it); the methods run in ``METHODS`` order: by stage (``spec.Stage``),
then as listed here.
"""

from __future__ import annotations

from spu_engine.methods.auto_freeze import SPEC as AUTO_FREEZE
from spu_engine.methods.distillation import SPEC as DISTILLATION
from spu_engine.methods.peft import ADALORA, ADAPTER, BITFIT, IA3, LORA
from spu_engine.methods.pruning import SPEC as PRUNING
from spu_engine.methods.selective_backprop import SPEC as SELECTIVE_BACKPROP
from spu_engine.methods.spec import MethodSpec, SectionSpec
from spu_engine.methods.weight_update_skipping import SPEC as WEIGHT_UPDATE_SKIPPING

SPECS: tuple[MethodSpec, ...] = (
    SELECTIVE_BACKPROP,
    WEIGHT_UPDATE_SKIPPING,
    PRUNING,
    BITFIT,
    ADAPTER,
    IA3,
    LORA,
    ADALORA,
    DISTILLATION,
    AUTO_FREEZE,
)

METHODS: tuple[MethodSpec, ...] = tuple(sorted(SPECS, key=lambda spec: spec.stage))  # stable: listed order in a stage


def section_specs() -> dict[str, SectionSpec]:
    """The method sections in policy order, each once (the PEFT methods share one)."""
    sections: dict[str, SectionSpec] = {}
    for spec in SPECS:
        known = sections.setdefault(spec.section, spec.section_spec)
        if known is not spec.section_spec:
            raise TypeError(f"section {spec.section!r} is registered twice with different settings ({spec.name})")
    return sections


def ablated_method() -> MethodSpec | None:
    """The method whose tensors `spu ablate` removes block by block, if one is registered (its spec's ``ablates``)."""
    return next((spec for spec in SPECS if spec.ablates), None)


def method_classes() -> list[type]:
    """The implementations (``methods.base.Method`` subclasses) in run order, importing them and so torch."""
    return [spec.load() for spec in METHODS]
