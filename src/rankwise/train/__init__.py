"""The training recipe and its parts (loss, schedule, checkpoints, metrics, hooks)."""
