"""The engine process: ``engine.Engine`` composes the trainer (one step, one evaluation), the run control (pause,
stop, boundaries), the policy record, the optimizer's groups and the event emitter; ``serve`` runs it behind the
socket."""
