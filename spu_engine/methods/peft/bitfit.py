"""BitFit (Ben Zaken et al. 2022): only the bias terms and the task head train."""

from __future__ import annotations

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
