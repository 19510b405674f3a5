"""(IA)^3 (Liu et al. 2022) through peft: learned vectors rescale keys, values and the feed-forward activations.

The vectors start at one, so adding IA3 to a running model leaves its function
unchanged.  The vectors and the task head train.
"""

from __future__ import annotations

from peft import IA3Config
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from torch import nn

from spu_engine.core.policy import PolicyError
from spu_engine.methods.base import Host
from spu_engine.methods.peft.base import AddedTensorsMethod
from spu_engine.methods.peft.inject import eject, inject, model_type
from spu_engine.methods.peft.settings import Peft
from spu_engine.methods.targets import NameSets, task_head_names

# peft's defaults target every module named "output.dense" in BERT-like models, which also catches the
# attention output; the paper rescales keys, values and the feed-forward activation only.
_BERT = (r".*\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense")
DEFAULTS: dict[str, tuple[object, object]] = {
    **{
        t: (
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[t],
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(t, []),
        )
        for t in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    },
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": (r".*\.(k_lin|v_lin|ffn\.lin2)", r".*\.ffn\.lin2"),
}
# names that are a feed-forward block's second projection in some architecture (its input is rescaled)
FEEDFORWARD_NAMES = {n for names in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.values() for n in names} | {
    "ffn.lin2",
    "lin2",
}


class IA3(AddedTensorsMethod):
    name = "ia3"
    fixed = ("target_modules",)

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.head = NameSets(host, task_head_names)

    def gate(self, name: str) -> bool:
        return name.endswith(".ia3_l") or name in self.head  # the stable name of peft's ia3_l.default

    def add_to(self, model: nn.Module, settings: Peft) -> list[nn.Parameter]:
        return inject(model, ia3_config(model, settings), "peft.target_modules")

    def uninstall(self) -> None:
        eject(self.host.model)


def ia3_config(model: nn.Module, settings: Peft) -> IA3Config:
    """peft's config for ``settings``: the modules to rescale, and which of them are feed-forward (input rescaled)."""
    if settings.target_modules:
        targets, feedforward = (
            list(settings.target_modules),
            [t for t in settings.target_modules if t in FEEDFORWARD_NAMES],
        )
    elif model_type(model) in DEFAULTS:
        targets, feedforward = DEFAULTS[model_type(model)]
    else:
        raise PolicyError(
            f"peft.target_modules: no default IA3 targets for model type {model_type(model)!r}; "
            "name the modules to rescale, e.g. [k_proj, v_proj, down_proj]"
        )
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=True)
