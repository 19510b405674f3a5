"""What an exported folder says about itself: ``spu_export.json`` (read by ``spu eval``) and ``README.md`` (read by
people), both naming the kind of folder, the base model, the task, the labels and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spu_engine.core.run_guard import EXPORT_INFO
from spu_engine.model.loading import AUTO_CLASSES
from spu_engine.tools.export.errors import ExportError

INFO = EXPORT_INFO  # what marks a previous export, the only folder --force replaces
FORMATS = ("model", "peft", "houlsby")

_LOAD = {
    "model": "model = {auto}.from_pretrained(folder{remote})",
    "peft": (
        'base = {auto}.from_pretrained("{reference}"{labels})\n'
        "model = PeftModel.from_pretrained(base, folder)  # model.merge_and_unload() gives a plain model"
    ),
    "houlsby": (
        "model = {auto}.from_pretrained(folder, trust_remote_code=True)  # the code is spu_houlsby.py, here\n\n"
        "# or, with SPU installed and no remote code:\n"
        "from spu_engine.tools.export.houlsby import load\n\n"
        "model = load(folder)"
    ),
}

_WHAT = {
    "model": "a Hugging Face model folder: the run's weights, pruning masks folded in{merged}.",
    "peft": (
        "a peft adapter folder ({method}): `adapter_config.json` and `adapter_model.safetensors`, applied to the "
        "base model `{reference}`. Modules the run changed outside the adapter layers (the task head, and anything "
        "else that trained or was pruned) are in `modules_to_save`."
    ),
    "houlsby": (
        "the run's model with its Houlsby bottleneck adapters (Houlsby et al. 2019), which no maintained library "
        "loads on this transformers version (AdapterHub's `adapters` requires transformers 4.57.x): the weights are "
        "a stock model folder plus the adapters' tensors, and `spu_houlsby.py` (torch only) puts the adapters back "
        "where `config.json`'s `spu_houlsby` says."
    ),
}


# what a mean-pooling folder's README adds to loading it (``spu_engine.model.pooling``, copied as spu_pooling.py)
_MEAN = {
    "model": (
        "model = {auto}.from_pretrained(folder, trust_remote_code=True)  # mean pooling: the code is {file}, here\n\n"
        "# or, with SPU installed and no remote code:\n"
        "from spu_engine.model.pooling import mean_pool\n\n"
        "model = mean_pool({auto}.from_pretrained(folder))"
    ),
    "peft": (
        "from spu_pooling import mean_pool  # this folder's spu_pooling.py (or spu_engine.model.pooling)\n\n"
        'base = mean_pool({auto}.from_pretrained("{reference}"{labels}))\n'
        "model = PeftModel.from_pretrained(base, folder)"
    ),
}
_POOLING = {
    "cls": "cls (the [CLS] token through the model's own head)",
    "mean": "mean (the mean of the last hidden states over the real tokens feeds the classifier; "
    "the stock class pools [CLS], so load it as below)",
}


def write_card(out_dir: Path, info: dict[str, Any], remote: bool = False) -> None:
    """``spu_export.json`` and ``README.md`` for the folder ``info`` describes (``info["format"]`` in FORMATS)."""
    (out_dir / INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    kind = info["format"]
    labels = info.get("labels")
    mean = info.get("pooling") == "mean"
    load = (_MEAN[kind] if mean and kind in _MEAN else _LOAD[kind]).format(
        auto=AUTO_CLASSES[info["model_kind"]],
        reference=info.get("base_reference"),
        labels=f", num_labels={len(labels)}" if labels else "",
        remote=", trust_remote_code=True" if remote else "",
        file="spu_compact.py" if remote else "spu_pooling.py",
    )
    pooling = f"- pooling: {_POOLING[info['pooling']]}\n" if info.get("pooling") else ""
    what = _WHAT[kind].format(
        merged=f", {info['peft_method']} merged into the weights" if info.get("merged") else "",
        method=info.get("peft_method"),
        reference=info.get("base_reference"),
    )
    text = (
        f"# {info['run']} at step {info['step']}, exported by `spu export`\n\n"
        f"This folder is {what}\n\n"
        f"- task: {info['task']}; labels (class ids in order): {labels or '-'}\n"
        f"- base model: `{info['base_reference']}`; trained at {info['max_length']} tokens per example\n"
        f"{pooling}"
        f"- checkpoint: `{info['checkpoint']}`\n\n"
        "## Load it\n\n"
        "```python\n"
        f"from transformers import {AUTO_CLASSES[info['model_kind']]}\n\n"
        'folder = "."  # this folder\n'
        f"{load}\n"
        "```\n\n"
        "## Score it\n\n"
        "```bash\nspu eval --model FOLDER --data DATA --split dev\n```\n"
    )
    (out_dir / "README.md").write_text(text, encoding="utf-8")


def read_info(folder: Path) -> dict[str, Any] | None:
    """The folder's ``spu_export.json``; None when it has none (not an SPU export, or an older one)."""
    path = Path(folder) / INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{path} is not JSON ({exc}); export the run again") from None
    if not isinstance(info, dict) or info.get("format") not in FORMATS:
        raise ExportError(f"{path}: no format among {', '.join(FORMATS)}; export the run again")
    return info
