"""AdaLoRA (Zhang et al. 2023) through peft: LoRA in SVD form (P diag(E) Q) whose ranks are cut to a budget.

peft's ``AdaLoraModel`` holds the rank allocator; its ranks move only when the
trainer calls ``update_and_allocate`` after each optimizer step and before the
gradients are cleared (peft issues 1801, 432), which ``after_update`` does.
The budget falls from ``init_r`` per matrix to ``target_r`` on a cubic schedule
between ``tinit`` and ``total_step - tfinal``; the masked singular values are
zero in ``lora_E``, so a checkpoint and a merged export carry the ranks.  A
``ranks`` event says each adapted module's rank whenever they change (at most
every ``stats_every`` steps, and when the allocation is final).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from spu_engine.core.policy import PolicyError
from spu_engine.methods.base import Host
from spu_engine.methods.peft.base import AddedTensorsMethod, LoRAPlus
from spu_engine.methods.peft.inject import eject, has_conv1d, inject_tuner
from spu_engine.methods.peft.lora import lora_targets
from spu_engine.methods.peft.settings import Peft
from spu_engine.methods.targets import NameSets, task_head_names
from spu_engine.model.loading import stable_name


def inject_adalora(model: nn.Module, settings: Peft, steps: int | None) -> tuple[list[nn.Parameter], AdaLoraModel]:
    """Put AdaLoRA into ``model`` in place; the new parameters, and peft's tuner that holds the rank allocator."""
    total = settings.total_step or steps
    if total is None:
        raise PolicyError(
            "peft.total_step: AdaLoRA's budget schedule needs the run's length; give total_step, or attach(..., steps=N)"
        )
    try:
        config = AdaLoraConfig(
            init_r=settings.init_r,
            target_r=settings.target_r,
            tinit=settings.tinit,
            tfinal=settings.tfinal,
            deltaT=settings.delta_t,
            total_step=total,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=lora_targets(model, settings),
            fan_in_fan_out=has_conv1d(model),
            bias="none",
        )
    except ValueError as exc:
        raise PolicyError(
            f"peft.tinit: {exc} (tinit {settings.tinit}, tfinal {settings.tfinal}, total_step {total})"
        ) from None
    return inject_tuner(model, config, "peft.target_modules", lambda: AdaLoraModel(model, config, "default"))


class AdaLoRA(LoRAPlus, AddedTensorsMethod):
    name = "adalora"
    size_setting = "init_r"
    fixed = ("init_r", "target_r", "alpha", "dropout", "target_modules", "tinit", "tfinal", "delta_t", "total_step")

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.head = NameSets(host, task_head_names)
        self.tuner: AdaLoraModel | None = None
        self.reported: dict[str, int] = {}  # module -> rank, as the last ranks event said
        self.warned = False

    def gate(self, name: str) -> bool:
        return ".lora_" in name or name in self.head

    def refuse_planned(self, settings: Peft, later: bool) -> None:
        raise PolicyError(
            "peft.method: adalora is not available in a sharded run: its rank allocator reads and masks whole "
            "matrices, which FSDP keeps in shards; use lora (with rank_pattern for uneven ranks), or run on one process"
        )

    def add_to(self, model: nn.Module, settings: Peft) -> list[nn.Parameter]:
        return inject_adalora(model, settings, self.host.config.steps)[0]

    def install(self, settings: Peft) -> list[nn.Parameter]:
        params, self.tuner = inject_adalora(self.host.model, settings, self.host.config.steps)
        self.reported = {}
        return params

    def uninstall(self) -> None:
        eject(self.host.model)
        self.tuner = None

    # ------------------------------------------------------------------ the rank allocation

    def _final_from(self) -> int:
        assert self.tuner is not None
        cfg = self.tuner.peft_config["default"]
        return cfg.total_step - cfg.tfinal

    def after_update(self, step: int) -> None:
        if self.tuner is None or not self.selected:
            return
        final = step >= self._final_from()
        if final:  # peft's last allocation ranks by the importance gathered so far, without a new look at the gradients
            scored = self.tuner.rankallocator.exp_avg_ipt
            unscored = any(".lora_" in n and n not in scored for n, _ in self.host.model.named_parameters())
        else:
            unscored = any(p.grad is None for n, p in self.host.params.items() if ".lora_" in n)
        if unscored:
            if (
                not self.warned
            ):  # the importance of a factor is |w x grad|: a frozen one (or a step that kept no sample) has none
                self.host.log(
                    "adalora: ranks are reallocated only on steps where every AdaLoRA factor has a gradient; some have none "
                    "(frozen by a rule, or selective backprop kept no sample), so the ranks stay as they are",
                    "warning",
                )
                self.warned = True
            return
        self.tuner.update_and_allocate(step)
        ranks = self.ranks()
        if ranks != self.reported and ((step + 1) % self.host.config.stats_every == 0 or step == self._final_from()):
            self.reported = ranks
            self.host.emit("ranks", step=step + 1, ranks=ranks, budget=sum(ranks.values()))

    def ranks(self) -> dict[str, int]:
        """Adapted module (stable name) -> its rank now: the singular values the allocator keeps."""
        assert self.tuner is not None
        cfg = self.tuner.peft_config["default"]
        out = {}
        for live, p in self.host.model.named_parameters():
            if ".lora_E." in live:
                kept = cfg.rank_pattern.get(live) if cfg.rank_pattern else None
                out[stable_name(live).removesuffix(".lora_E")] = int(sum(kept)) if kept is not None else p.shape[0]
        return out

    # ------------------------------------------------------------------ what survives a resume

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.tuner is not None:
            pattern = self.tuner.peft_config["default"].rank_pattern or {}
            state["rank_pattern"] = {stable_name(k): v for k, v in pattern.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.tuner is not None and state.get("rank_pattern"):
            live = {stable_name(n): n for n, _ in self.host.model.named_parameters()}
            self.tuner.peft_config["default"].rank_pattern = {
                live.get(k, k): v for k, v in state["rank_pattern"].items()
            }
            self.reported = self.ranks()

    def tensor_state(self) -> dict[str, torch.Tensor]:
        if self.tuner is None:
            return {}
        allocator = self.tuner.rankallocator
        out = {}
        for kind, table in (("ipt", allocator.exp_avg_ipt), ("unc", allocator.exp_avg_unc)):
            out.update({f"{kind}.{stable_name(n)}": t for n, t in table.items()})
        return out

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.tuner is None:
            return
        allocator = self.tuner.rankallocator
        for live, p in self.host.model.named_parameters():
            name = stable_name(live)
            if f"ipt.{name}" in tensors:
                allocator.ipt[live] = torch.zeros_like(
                    p
                )  # recomputed each step; present, so the averages are not reset
                allocator.exp_avg_ipt[live] = tensors[f"ipt.{name}"].to(p.device)
                allocator.exp_avg_unc[live] = tensors[f"unc.{name}"].to(p.device)
