"""The client-facing wire formats the sidecar speaks, translated to and from canonical chat."""
