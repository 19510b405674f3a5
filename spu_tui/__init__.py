"""The console (Textual): imports Textual, rich, plotext and, of the engine, only ``spu_engine.core`` and the methods'
settings, so it starts without torch and drives the engine as a process over its socket."""
