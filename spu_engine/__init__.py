"""SPU's engine and everything the console shares with it.

The one boundary: ``core`` and the methods' settings and registry load without torch, and they are all the console
(``spu_tui``) may import (``tests/core/test_layering.py``).  The rest is the engine:

- ``core``: policy and its files, protocol, run folders, settings and run options, transport, advice, views
- ``methods``: one package a method (settings beside code), registered once in ``methods/registry.py``
- ``runtime``: the policy applied to a model (the methods' host), what rules select, per-unit statistics
- ``loop``: the engine process: the step, run control, commands, events, distributed runs, the server
- ``model``, ``tasks``, ``storage`` (checkpoints, events.jsonl), ``tools`` (report, export, eval, ablate)
- ``integrations``: the policy in your own loop or a Hugging Face Trainer;  ``cli``: the ``spu`` commands
"""
