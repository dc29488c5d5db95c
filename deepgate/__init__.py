"""deepgate's shared core: chat types, the error table, config models, logging.

Nothing here knows APISIX or gRPC servers; ``plugins``, ``sidecar`` and ``devgateway`` import
this package, and it imports none of them.
"""
