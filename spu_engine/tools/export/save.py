"""The exported folder: ``save_pretrained``, and the loading code a stock class lacks.

Two cases need code: heads removed (``spu_compact.py``: ``compact_heads.py`` plus a subclass that removes the heads
``config.spu_compact`` lists) and Houlsby adapters (``spu_houlsby.py``: ``houlsby.py`` plus a subclass that puts
the adapters ``config.spu_houlsby`` lists back).  The subclass is named in ``auto_map``, so
``from_pretrained(folder, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from spu_engine.model import compact_heads, houlsby
from spu_engine.model.loading import AUTO_CLASSES

# config key -> (file written, class prefix, the module it copies, the call that rebuilds the model)
REMOTE = {
    "spu_compact": ("spu_compact", "SpuCompact", compact_heads, "remove_heads(self, config.spu_compact)"),
    "spu_houlsby": ("spu_houlsby", "SpuHoulsby", houlsby, "attach_adapters(self, config.spu_houlsby)"),
}


def save_model(model: nn.Module, out_dir: Path, kind: str) -> bool:
    """``save_pretrained``, plus the loading code when the stock class cannot load the folder; True if it was
    needed."""
    key = next((k for k in REMOTE if getattr(model.config, k, None)), None)
    if key is not None:
        file, prefix, _, _ = REMOTE[key]
        model.config.auto_map = {AUTO_CLASSES[kind]: f"{file}.{prefix}{type(model).__name__}"}
    model.save_pretrained(out_dir)
    if key is None:
        return False
    file, prefix, source, call = REMOTE[key]
    remote = f"{prefix}{type(model).__name__}"
    (Path(out_dir) / f"{file}.py").write_text(_remote_code(model, remote, source, call))
    config_path = Path(out_dir) / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [remote]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def _remote_code(model: nn.Module, remote: str, source, call: str) -> str:
    stock = type(model).__name__
    return Path(source.__file__).read_text() + (
        f"\n\nfrom transformers import {stock} as _Stock  # noqa: E402\n\n\n"
        f"class {remote}(_Stock):\n"
        f'    """{stock} as SPU exported it: {call.split("(")[0]} on loading."""\n\n'
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        f"        {call}\n"
    )
