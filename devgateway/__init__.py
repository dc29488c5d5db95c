"""APISIX's stand-in for local runs and tests (the protocol driver lives in ``driver``)."""
