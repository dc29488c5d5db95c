"""The router's configuration: aliases, their targets and strategies, content rules.

Everything the request path needs is compiled here, once per prepared conf: each alias becomes a
``CompiledAlias`` with its targets' providers, regions, external flags, prices and context windows
looked up in the catalog, so a request only filters and orders small tuples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from deepgate.catalog import Catalog, load_catalog
from deepgate.config import StrictModel
from plugins.base import PluginConfig

Strategy = Literal["priority", "weighted", "least_latency", "lowest_cost"]
STRATEGIES: tuple[Strategy, ...] = ("priority", "weighted", "least_latency", "lowest_cost")

_TARGET = re.compile(r"^[A-Za-z0-9_.-]+:[^\s,;]+$")


class ContentRule(StrictModel):
    """Send a prompt elsewhere when it mentions a keyword or carries code."""

    name: str = Field(min_length=1)
    keywords: list[str] = Field(default_factory=list)
    code: bool = False  # the prompt carries source code (fenced blocks or code-like lines)
    alias: str = Field(min_length=1)  # where matching prompts go

    @model_validator(mode="after")
    def _has_a_test(self) -> ContentRule:
        if not self.keywords and not self.code:
            raise ValueError(f"content rule {self.name!r} needs keywords or code: true")
        return self


class AliasRoute(StrictModel):
    """One alias clients may ask for: its targets and how to order them."""

    targets: list[str] = Field(min_length=1)
    strategy: Strategy | None = None  # None: the config's default strategy
    weights: dict[str, float] | None = None  # weighted: target -> weight (> 0)
    long_context_alias: str | None = None  # prompts no target here can hold go there
    rules: list[ContentRule] = Field(default_factory=list)

    @field_validator("targets")
    @classmethod
    def _targets_are_provider_model(cls, targets: list[str]) -> list[str]:
        for i, target in enumerate(targets):
            if not _TARGET.match(target):
                raise ValueError(
                    f"targets[{i}] {target!r} is not a 'provider:model' target "
                    "(e.g. 'deepseek:deepseek-chat')"
                )
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        if dupes:
            raise ValueError(f"targets repeat {', '.join(dupes)}; list each target once")
        return targets


class StatsConfig(StrictModel):
    """How the least-latency strategy learns the sidecar's provider latencies."""

    refresh_s: float = Field(default=2.0, gt=0)  # how often the snapshot is refreshed
    timeout_ms: int = Field(default=200, gt=0)  # deadline of one ProviderStats call
    ewma_alpha: float = Field(default=0.3, gt=0, le=1)  # weight of the newest sample
    max_age_s: float = Field(default=30.0, gt=0)  # an older snapshot counts as unavailable


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """A target as the request path sees it (catalog facts looked up once)."""

    label: str
    provider: str
    region: str | None
    external: bool
    context_window: int | None
    input_per_mtok: float
    output_per_mtok: float


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    keywords: tuple[str, ...]  # lower-case
    code: bool
    alias: str


@dataclass(frozen=True, slots=True)
class CompiledAlias:
    name: str
    targets: tuple[TargetInfo, ...]
    strategy: Strategy
    weights: dict[str, float]  # target -> weight (weighted strategy; 1 unless configured)
    long_context_alias: str | None
    rules: tuple[CompiledRule, ...]
    max_window: int | None  # the largest known context window among the targets
    min_window: int | None  # the smallest known one (below it no count is needed)


class Config(PluginConfig):
    aliases: dict[str, AliasRoute | list[str]] = Field(min_length=1)
    strategy: Strategy = "priority"  # the default for aliases that name none
    default_max_tokens: int = Field(default=512, gt=0)  # completion estimate for lowest_cost
    stats: StatsConfig = Field(default_factory=StatsConfig)
    catalog: str | None = None  # path of a catalog file; default: DEEPGATE_CATALOG or shipped
    route_ttl_s: float = Field(default=60.0, gt=0)  # how long a signed route stays valid
    # personal data under the policy rule "local", for an alias without a local target
    personal_data_alias: str | None = None

    _compiled: dict[str, CompiledAlias] = PrivateAttr()

    @model_validator(mode="after")
    def _compile(self) -> Config:
        catalog = load_catalog(self.catalog)
        routes = {
            name: r if isinstance(r, AliasRoute) else AliasRoute(targets=r)
            for name, r in self.aliases.items()
        }
        for name, route in routes.items():
            _check_alias_refs(name, route, routes)
        if self.personal_data_alias is not None and self.personal_data_alias not in routes:
            raise ValueError(
                f"personal_data_alias names {self.personal_data_alias!r}, which is not an alias "
                "of this config; add it under aliases"
            )
        self._compiled = {
            name: _compile_alias(name, route, self.strategy, catalog)
            for name, route in routes.items()
        }
        return self

    @property
    def compiled(self) -> dict[str, CompiledAlias]:
        compiled: dict[str, CompiledAlias] = self.private("_compiled")
        return compiled


def _check_alias_refs(name: str, route: AliasRoute, routes: dict[str, AliasRoute]) -> None:
    where = f"aliases.{name}"
    if route.long_context_alias is not None and route.long_context_alias not in routes:
        raise ValueError(
            f"{where}.long_context_alias names {route.long_context_alias!r}, which is not an "
            "alias of this config; add it under aliases"
        )
    for i, rule in enumerate(route.rules):
        if rule.alias not in routes:
            raise ValueError(
                f"{where}.rules[{i}].alias names {rule.alias!r}, which is not an alias of this "
                "config; add it under aliases"
            )
    if route.weights is not None:
        unknown = sorted(set(route.weights) - set(route.targets))
        if unknown:
            raise ValueError(
                f"{where}.weights names {', '.join(unknown)}, not among the alias's targets"
            )
        bad = sorted(t for t, w in route.weights.items() if w <= 0)
        if bad:
            raise ValueError(f"{where}.weights must be > 0; fix {', '.join(bad)}")


def _compile_alias(
    name: str, route: AliasRoute, default: Strategy, catalog: Catalog
) -> CompiledAlias:
    targets = tuple(_target_info(t, catalog) for t in route.targets)
    windows = [t.context_window for t in targets if t.context_window is not None]
    weights = route.weights or {}
    return CompiledAlias(
        name=name,
        targets=targets,
        strategy=route.strategy or default,
        weights={t.label: float(weights.get(t.label, 1.0)) for t in targets},
        long_context_alias=route.long_context_alias,
        rules=tuple(
            CompiledRule(r.name, tuple(k.lower() for k in r.keywords), r.code, r.alias)
            for r in route.rules
        ),
        max_window=max(windows) if windows else None,
        min_window=min(windows) if windows else None,
    )


def _target_info(label: str, catalog: Catalog) -> TargetInfo:
    model = catalog.models.get(label)
    return TargetInfo(
        label=label,
        provider=label.partition(":")[0],
        region=catalog.region(label),
        external=catalog.external(label),
        context_window=model.context_window if model else None,
        input_per_mtok=model.input_per_mtok if model else 0.0,
        output_per_mtok=model.output_per_mtok if model else 0.0,
    )
