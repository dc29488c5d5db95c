"""APISIX's stand-in for local runs and tests: serves the same two APISIX files, as APISIX would.

Modules, in the order a request meets them:

- ``__main__``: the command line, start-up and graceful stop.
- ``conf``: reading ``config.yaml`` and ``apisix.yaml``; refusing what is not imitated.
- ``supervisor``: spawning and respawning the plugin runner from ``ext-plugin.cmd``.
- ``routing``: which route serves a request (APISIX's radixtree host/uri order).
- ``gateway``: the phases of a request in APISIX's order, the filters, the access log.
- ``exchange`` / ``variables``: one request's state, and its ``$variables``.
- ``keyauth``: the key-auth plugin. ``rewrite`` and ``expr``: response-rewrite and its ``vars``.
- ``extplugin``: the three ext-plugin phases; ``driver``: APISIX's side of the runner protocol.
- ``upstream``: balancing and proxying; ``responses``: replies, error pages, sending.
- ``launch``: ``make run`` (the sidecar and devgateway together).
"""
