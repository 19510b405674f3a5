"""``python -m spu_engine.cli``: the ``spu`` command (torchrun and the console start the engine this way)."""

from spu_engine.cli import main

if __name__ == "__main__":
    main()
