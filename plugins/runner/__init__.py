"""The APISIX external-plugin runner: the codec, the conf cache and the protocol server."""
