"""What a run writes as it trains: checkpoints that are never half-written, and ``events.jsonl``."""
