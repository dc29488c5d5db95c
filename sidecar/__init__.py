"""The deepgate sidecar: provider adapters with fallback behind gRPC and an HTTP face."""
