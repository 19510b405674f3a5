"""Houlsby bottleneck adapters: ``h + up(act(down(h)))`` after a sublayer's output module, applied by a forward hook.

Self-contained on purpose: it imports only torch, so ``spu export`` of an adapter run ships this file in the folder
as its loading code (``from_pretrained(folder, trust_remote_code=True)``).  Where the adapters go is a ``spec``:
``{"size": m, "sites": [[output module path, slot], ...]}``; each adapter is held as ``slot`` by the output module's
parent, so its tensors are named ``<parent>.<slot>.down.weight`` and so on.
"""

from __future__ import annotations

from torch import nn

INIT_STD = 1e-2


class BottleneckAdapter(nn.Module):
    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        self.act = nn.GELU()
        self.up = nn.Linear(m, d)
        self.enabled = True  # off: the sublayer output passes through (adapter ablation)
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(layer.bias)

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))

    def after(self, module, args, output):
        """Forward hook: the sublayer output passes through the adapter."""
        if not self.enabled:
            return output
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def attach_adapters(model: nn.Module, spec: dict) -> tuple[list, list[tuple[nn.Module, str]]]:
    """Put an adapter after each site of ``spec`` (module paths from the model's root); returns the forward hooks
    that apply them and (parent, slot) where each is held."""
    d = model.config.hidden_size
    hooks, slots = [], []
    for path, slot in spec["sites"]:
        output = model.get_submodule(path)
        parent = model.get_submodule(path.rpartition(".")[0])
        ref = next(iter(parent.parameters()), None)
        ref = next(model.parameters()) if ref is None else ref
        adapter = BottleneckAdapter(d, spec["size"]).to(device=ref.device, dtype=ref.dtype)
        parent.add_module(slot, adapter)
        slots.append((parent, slot))
        hooks.append(output.register_forward_hook(adapter.after))
    return hooks, slots
