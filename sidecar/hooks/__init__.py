"""The answer hooks the sidecar runs (see sidecar/answer_hooks.py), one module each."""
