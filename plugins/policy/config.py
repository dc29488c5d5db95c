"""The policy plugin's config: who a consumer is, what it may use, how much, and where.

Validated once, when APISIX prepares the route: an unknown key, a group nobody defined, a target
that is not ``provider:model`` or a quota of zero is a PrepareConf error naming the field. The
validator also compiles what the request path needs (the rule chain per consumer, prices per
alias), so a request does dictionary lookups only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from deepgate.catalog import Catalog, load_catalog
from deepgate.config import StrictModel
from plugins.base import PluginConfig

PersonalData = Literal["allow", "local", "refuse"]

_MAX_REMEMBERED = 10_000  # consumers and aliases remembered per prepared conf


class Quota(StrictModel):
    """Limits on one budget; a field left out is no limit. Windows are fixed, in UTC."""

    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_day: int | None = Field(default=None, gt=0)
    spend_per_month_usd: float | None = Field(default=None, gt=0)


class Rule(StrictModel):
    """What a group (or a consumer) may reach. ``None`` means no restriction from this rule."""

    models: list[str] | None = None  # model aliases (fnmatch patterns: "gpt-5*")
    providers: list[str] | None = None
    routes: list[str] | None = None  # APISIX route ids
    regions: list[str] | None = None  # provider regions (data residency), as the catalog names them
    personal_data: PersonalData | None = None  # prompts with personal data: allow, local, refuse
    quota: Quota | None = None  # a group's quota is shared by its members
    model_quotas: dict[str, Quota] = Field(default_factory=dict)  # per model alias


class ConsumerRule(Rule):
    groups: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    log_opt_out: bool = False  # no prompt/answer logging for this consumer


@dataclass(frozen=True, slots=True)
class Scoped:
    """A rule and the config path it came from (named in denials)."""

    path: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class Identity:
    """A consumer as the policy sees it: its own rule, then its groups' rules."""

    consumer: str
    groups: tuple[str, ...]
    labels: dict[str, str]
    log_opt_out: bool
    rules: tuple[Scoped, ...]
    allowed_providers: list[str] | None
    allowed_regions: list[str] | None
    personal_data: PersonalData | None


@dataclass(slots=True)
class Compiled:
    catalog: Catalog
    identities: dict[str, Identity] = field(default_factory=dict)
    default: Identity | None = None
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # alias -> priced targets
    # alias -> the (input, output) prices per million tokens of its targets that may cost most
    prices: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)


_STRICTNESS: dict[PersonalData, int] = {"allow": 0, "local": 1, "refuse": 2}


def _intersect(lists: list[list[str] | None]) -> list[str] | None:
    """What every rule allows; ``None`` when no rule restricts."""
    out: list[str] | None = None
    for values in lists:
        if values is None:
            continue
        out = list(values) if out is None else [v for v in out if v in values]
    return sorted(set(out)) if out is not None else None


def _check_names(path: str, rule: Rule, catalog: Catalog) -> None:
    """Providers and regions must be ones the catalog knows: a typo would deny everything."""
    regions = {p.region for p in catalog.providers.values()}
    for i, provider in enumerate(rule.providers or ()):
        if provider not in catalog.providers:
            known = ", ".join(sorted(catalog.providers))
            raise ValueError(
                f"{path}.providers[{i}]: unknown provider {provider!r} (known: {known})"
            )
    for i, region in enumerate(rule.regions or ()):
        if region not in regions:
            known = ", ".join(sorted(regions))
            raise ValueError(
                f"{path}.regions[{i}]: no provider in the catalog is in region {region!r} "
                f"(regions: {known})"
            )


class Config(PluginConfig):
    store: Literal["redis", "memory"] = "redis"
    redis_url: str = "$env://DEEPGATE_REDIS_URL"
    redis_timeout_ms: int = Field(default=100, gt=0, le=10_000)
    store_unreachable: Literal["open", "closed"] = "closed"
    default_max_tokens: int = Field(default=1024, gt=0)
    reservation_ttl_s: int = Field(default=900, ge=60)
    allow_anonymous: bool = False
    consumers: dict[str, ConsumerRule] = Field(default_factory=dict)
    default: ConsumerRule | None = None  # consumers not listed under `consumers`
    groups: dict[str, Rule] = Field(default_factory=dict)
    model_quotas: dict[str, Quota] = Field(default_factory=dict)  # shared by every consumer
    aliases: dict[str, list[str]] = Field(default_factory=dict)  # alias -> provider:model chain
    catalog_file: str | None = None  # else DEEPGATE_CATALOG, else the shipped catalog

    _compiled: Compiled = PrivateAttr()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value.startswith(("$", "redis://", "rediss://", "unix://")):
            return value
        raise ValueError(
            "write a redis://, rediss:// or unix:// URL, or a secret reference such as "
            "$env://DEEPGATE_REDIS_URL"
        )

    @model_validator(mode="after")
    def _compile(self) -> Config:
        for alias, chain in self.aliases.items():
            if not chain:
                raise ValueError(f"aliases.{alias}: a chain needs at least one target")
            for i, target in enumerate(chain):
                provider, sep, model = target.partition(":")
                if not (provider and sep and model):
                    raise ValueError(f"aliases.{alias}[{i}]: write targets as provider:model")
        try:  # regions and prices come from the catalog
            catalog = load_catalog(self.catalog_file)
        except ValueError as exc:  # ConfigError: file, path and fix already in the message
            raise ValueError(f"catalog_file: {exc}") from None
        compiled = Compiled(catalog)
        rules: list[tuple[str, Rule]] = [(f"groups.{g}", r) for g, r in self.groups.items()]
        rules += [(f"consumers.{c}", r) for c, r in self.consumers.items()]
        if self.default is not None:
            rules.append(("default", self.default))
        for path, rule in rules:
            _check_names(path, rule, catalog)
        for name, rule in self.consumers.items():
            compiled.identities[name] = self._identity(name, f"consumers.{name}", rule)
        if self.default is not None:
            compiled.default = self._identity("", "default", self.default)
        self._compiled = compiled
        return self

    def _identity(self, name: str, path: str, rule: ConsumerRule) -> Identity:
        scoped = [Scoped(path, rule)]
        for i, group in enumerate(rule.groups):
            found = self.groups.get(group)
            if found is None:
                known = ", ".join(sorted(self.groups)) or "none"
                raise ValueError(
                    f"{path}.groups[{i}]: unknown group {group!r}; define it under groups "
                    f"(defined: {known})"
                )
            scoped.append(Scoped(f"groups.{group}", found))
        strictest: PersonalData | None = None
        for s in scoped:
            pd = s.rule.personal_data
            if pd is not None and (strictest is None or _STRICTNESS[pd] > _STRICTNESS[strictest]):
                strictest = pd
        return Identity(
            consumer=name,
            groups=tuple(rule.groups),
            labels=dict(rule.labels),
            log_opt_out=rule.log_opt_out,
            rules=tuple(scoped),
            allowed_providers=_intersect([s.rule.providers for s in scoped]),
            allowed_regions=_intersect([s.rule.regions for s in scoped]),
            personal_data=strictest,
        )

    def identity(self, consumer: str) -> Identity | None:
        """The consumer's identity; the ``default`` one (renamed) for consumers not listed."""
        found = self.compiled.identities.get(consumer)
        if found is not None:
            return found
        default = self.compiled.default
        if default is None:
            return None
        found = dataclasses.replace(default, consumer=consumer)
        if len(self.compiled.identities) < _MAX_REMEMBERED:
            self.compiled.identities[consumer] = found
        return found

    def chain(self, alias: str) -> tuple[str, ...]:
        """The targets an alias may reach, as far as this config knows (for prices, regions).

        The ``aliases`` table when it lists the alias; a ``provider:model`` alias is its own
        target; else the catalog's targets of that model name; else nothing (unknown).
        """
        chains = self.compiled.chains
        found = chains.get(alias)
        if found is None:
            if alias in self.aliases:
                found = tuple(self.aliases[alias])
            elif ":" in alias:
                found = (alias,)
            else:
                models = self.compiled.catalog.models
                found = tuple(t for t in models if t.partition(":")[2] == alias)
            if len(chains) < _MAX_REMEMBERED:
                chains[alias] = found
        return found

    def prices(self, alias: str) -> tuple[tuple[float, float], ...]:
        """The (input, output) USD per million tokens an alias may cost, from its chain (every
        catalog model when the chain is unknown), without the pairs another pair beats on both
        counts: the estimate's worst case is the most expensive of these."""
        compiled = self.compiled
        found = compiled.prices.get(alias)
        if found is None:
            catalog = compiled.catalog
            pairs = {catalog.prices(t) for t in self.chain(alias) or tuple(catalog.models)}
            found = tuple(
                sorted(
                    p
                    for p in pairs
                    if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in pairs)
                )
            )
            if len(compiled.prices) < _MAX_REMEMBERED:
                compiled.prices[alias] = found
        return found

    @property
    def compiled(self) -> Compiled:
        compiled: Compiled = self.private("_compiled")
        return compiled

    @property
    def catalog(self) -> Catalog:
        return self.compiled.catalog
