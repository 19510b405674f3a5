"""The policy applied to a model: ``PolicyRuntime`` (the methods' host, one in the engine and one in your own loop),
what a policy's rules select, and what each unit is doing."""
