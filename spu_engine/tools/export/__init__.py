"""Export a run's model as a folder the ecosystem loads, pruning masks folded in (``spu export``).

- ``run.py``: ``export_run``, the whole export, and its ``ExportReport``.
- ``weights.py``: the checkpoint loaded into the run's architecture with its PEFT tensors, masks folded, peft's
  tuners merged on request.
- ``peft_folder.py``: a LoRA / AdaLoRA / (IA)3 run as a peft adapter folder.
- ``houlsby.py``: ``load``, a Houlsby-adapter export without its remote code.
- ``card.py``: the folder's ``spu_export.json`` and ``README.md``.
- ``ffn.py``, ``blocks.py``, ``heads.py``: ``--compact``, removing the FFN neurons, GPT-2 blocks and attention
  heads that pruning killed, so the saved model is physically smaller and faster.
- ``target.py``: where it writes: never a run or a checkpoint; a previous export only with ``--force``; written
  aside and renamed into place, so a killed export leaves no half-written folder.
- ``save.py``: the folder, with the loading code when heads were removed or adapters added.
- ``probe.py``: a probe batch, to time the dense and compact models and compare their outputs.
"""

from spu_engine.tools.export.blocks import remove_blocks
from spu_engine.tools.export.errors import ExportError
from spu_engine.tools.export.ffn import compact_ffn, fold_constant_neurons
from spu_engine.tools.export.heads import compact_attention
from spu_engine.tools.export.probe import probe_batch, time_forward
from spu_engine.tools.export.run import ExportReport, export_run
from spu_engine.tools.export.save import save_model
from spu_engine.tools.export.weights import fold_masks, merge_tuners

__all__ = [
    "ExportError",
    "ExportReport",
    "compact_attention",
    "compact_ffn",
    "export_run",
    "fold_constant_neurons",
    "fold_masks",
    "merge_tuners",
    "probe_batch",
    "remove_blocks",
    "save_model",
    "time_forward",
]
