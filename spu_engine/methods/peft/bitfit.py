"""BitFit (Ben Zaken et al. 2022): only the bias terms and the task head train.

It adds no tensor, so ``peft.lr`` reaches the tensors it trains as a learning-rate multiplier (``peft.lr`` / the
run's lr), through the same optimizer groups as the ``lr`` section's rules."""

from __future__ import annotations

from spu_engine.core.policy import Policy
from spu_engine.methods.base import Host
from spu_engine.methods.peft.base import PeftMethod
from spu_engine.methods.targets import NameSets, is_bias, task_head_names


class BitFit(PeftMethod):
    name = "bitfit"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.head = NameSets(host, task_head_names)

    def gate(self, name: str) -> bool:
        return is_bias(name) or name in self.head

    def lr_multipliers(self, policy: Policy, names: list[str]) -> dict[str, float]:
        if policy.peft.method != self.name or policy.peft.lr is None:
            return {}
        return {n: policy.peft.lr / self.host.config.lr for n in names if self.gate(n)}

    def lr_setting(self, policy: Policy) -> str | None:
        return "peft.lr" if policy.peft.method == self.name and policy.peft.lr is not None else None
