"""Models: loading any HF architecture with the task's head, its units and stable names; removing attention heads."""
