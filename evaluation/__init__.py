"""``make eval``: lm-evaluation-harness tasks on our own model, bits per byte, generation quality."""
