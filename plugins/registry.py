"""The plugins this runner serves, by the name APISIX routes use. One explicit list."""

from __future__ import annotations

from plugins import auth_bridge, cache, policy, prompt_filter, rag, router, safety
from plugins.base import PluginSpec


def build_registry(specs: list[PluginSpec]) -> dict[str, PluginSpec]:
    registry: dict[str, PluginSpec] = {}
    for spec in specs:
        if spec.name in registry:
            raise ValueError(f"two plugins are named {spec.name!r}")
        registry[spec.name] = spec
    return registry


REGISTRY = build_registry(
    [
        auth_bridge.SPEC,
        policy.SPEC,
        prompt_filter.SPEC,
        safety.SPEC,
        cache.SPEC,
        rag.SPEC,
        router.SPEC,
    ]
)
