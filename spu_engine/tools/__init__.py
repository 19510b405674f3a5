"""The commands that read a finished or running run: ``spu report``, ``spu export``, ``spu eval``, ``spu ablate``."""
