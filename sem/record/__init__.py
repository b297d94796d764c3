"""What a run leaves behind for people and tools: ``summary`` (summary.json, config_resolved.yaml,
attempts.jsonl), ``provenance`` (env.json), ``plots`` (loss and LR curves) and ``units`` (durations)."""
