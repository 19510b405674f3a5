"""The exported folder: ``save_pretrained``, and when heads were removed the code that loads it.

That code is ``spu_compact.py``: ``compact_heads.py`` plus a subclass of the model's class that removes the heads
``config.spu_compact`` lists, named in ``auto_map``, so ``from_pretrained(folder, trust_remote_code=True)`` loads
it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from spu_engine.model import compact_heads
from spu_engine.model.loading import AUTO_CLASSES


def save_model(model: nn.Module, out_dir: Path, kind: str) -> bool:
    """``save_pretrained``, plus the loading code when heads were removed; True if it was needed."""
    needs_code = bool(getattr(model.config, "spu_compact", None))
    if needs_code:
        model.config.auto_map = {AUTO_CLASSES[kind]: f"spu_compact.{_remote_class(model)}"}
    model.save_pretrained(out_dir)
    if needs_code:
        (Path(out_dir) / "spu_compact.py").write_text(_remote_code(model))
        config_path = Path(out_dir) / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [_remote_class(model)]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return needs_code


def _remote_class(model: nn.Module) -> str:
    return f"SpuCompact{type(model).__name__}"


def _remote_code(model: nn.Module) -> str:
    stock = type(model).__name__
    return Path(compact_heads.__file__).read_text() + (
        f"\n\nfrom transformers import {stock} as _Stock  # noqa: E402\n\n\n"
        f"class {_remote_class(model)}(_Stock):\n"
        f'    """{stock} with the attention heads listed in ``config.spu_compact`` removed."""\n\n'
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        "        remove_heads(self, config.spu_compact)\n"
    )
