"""The exported folder: ``save_pretrained``, and the loading code a stock class lacks.

Three cases need code: heads removed (``spu_compact.py``: ``compact_heads.py`` plus a subclass that removes the
heads ``config.spu_compact`` lists), Houlsby adapters (``spu_houlsby.py``: ``houlsby.py`` plus a subclass that puts
the adapters ``config.spu_houlsby`` lists back) and mean pooling (``spu_pooling.py``: ``pooling.py`` plus a subclass
that pools as ``config.spu_pooling`` says).  The subclass is named in ``auto_map``, so
``from_pretrained(folder, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from spu_engine.model import compact_heads, houlsby, pooling
from spu_engine.model.loading import AUTO_CLASSES

# config key -> (file written, class prefix, the module it copies, the call that rebuilds the model); a model that
# needs several (Houlsby adapters and mean pooling) gets the first's file with every module and call, in this order
# (``pooling.py`` last: it alone has no ``from __future__``, which must open a file)
REMOTE = {
    "spu_compact": ("spu_compact", "SpuCompact", compact_heads, "remove_heads(self, config.spu_compact)"),
    "spu_houlsby": ("spu_houlsby", "SpuHoulsby", houlsby, "attach_adapters(self, config.spu_houlsby)"),
    "spu_pooling": ("spu_pooling", "SpuPooling", pooling, "use_pooling(self, config.spu_pooling)"),
}


def save_model(model: nn.Module, out_dir: Path, kind: str) -> bool:
    """``save_pretrained``, plus the loading code when the stock class cannot load the folder; True if it was
    needed."""
    keys = [k for k in REMOTE if getattr(model.config, k, None)]
    if keys:
        file, prefix, _, _ = REMOTE[keys[0]]
        model.config.auto_map = {AUTO_CLASSES[kind]: f"{file}.{prefix}{type(model).__name__}"}
    model.save_pretrained(out_dir)
    if not keys:
        return False
    file, prefix, _, _ = REMOTE[keys[0]]
    remote = f"{prefix}{type(model).__name__}"
    (Path(out_dir) / f"{file}.py").write_text(_remote_code(model, remote, [REMOTE[k] for k in keys]))
    config_path = Path(out_dir) / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [remote]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def _remote_code(model: nn.Module, remote: str, parts: list[tuple]) -> str:
    stock = type(model).__name__
    calls = [call for _, _, _, call in parts]
    return "\n\n".join(Path(source.__file__).read_text() for _, _, source, _ in parts) + (
        f"\n\nfrom transformers import {stock} as _Stock  # noqa: E402\n\n\n"
        f"class {remote}(_Stock):\n"
        f'    """{stock} as SPU exported it: {", ".join(c.split("(")[0] for c in calls)} on loading."""\n\n'
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n" + "".join(f"        {call}\n" for call in calls)
    )
