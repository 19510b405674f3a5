"""What the console and the engine share, with no torch: the console imports this package and nothing else of the
engine but the methods' settings (``tests/core/test_layering.py`` holds it to that)."""
