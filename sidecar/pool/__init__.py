"""The inference pool: models deepgate runs itself, behind dynamic micro-batching."""
