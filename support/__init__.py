"""The machinery a reader of the paper does not need: the rollout engine's internals (engine), the
batches and the forward pass (batches; shared_prompt: a group's prompt once in training), prompts,
the answer matching and judges (answers, judge), data loading and converters (data, convert), checkpoints
(checkpoint), policy loading and precision (policy), torchrun (dist), metrics and curves (metrics),
presets, memory and time estimates (memory, bench), tiny and real-config models for tests (models).
Nothing here imports the toy world (toy/); the method files import from here, not the reverse, but for
their records (tests/test_project.py checks both)."""
