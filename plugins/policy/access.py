"""Access control and compliance: which routes, models, providers and regions a consumer reaches.

A consumer is held to its own rule and to every one of its groups' rules: each rule that
restricts something must allow it. A denial is a 403 naming the rule (its path in the config) so
that the consumer knows whom to ask. Provider and region restrictions are handed to the router as
facts (it picks only targets inside them); the policy refuses on its own only when it knows the
alias's whole chain (the ``aliases`` table, or a ``provider:model`` alias) and none of it is
allowed. The personal-data rule is handed on as well: the safety plugin finds personal data, the
router sends such prompts to a local model or refuses them.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from deepgate.errors import PermissionDenied
from deepgate.request_facts import Facts
from plugins.policy.config import Config, Identity


def _who(identity: Identity) -> str:
    return f"Consumer {identity.consumer!r}" if identity.consumer else "An anonymous client"


def check_route(identity: Identity, route: str | None) -> None:
    for scoped in identity.rules:
        routes = scoped.rule.routes
        if routes is not None and (route is None or route not in routes):
            raise PermissionDenied(
                f"{_who(identity)} may not use this route ({route or 'unnamed'}): rule "
                f"{scoped.path}.routes allows {', '.join(routes) or 'none'}. Ask your operator "
                "for access."
            )


def check_model(identity: Identity, alias: str) -> None:
    for scoped in identity.rules:
        models = scoped.rule.models
        if models is not None and not any(fnmatchcase(alias, p) for p in models):
            allowed = ", ".join(models) or "none"
            raise PermissionDenied(
                f"{_who(identity)} may not use model {alias!r}: rule {scoped.path}.models allows "
                f"{allowed}. Use one of those, or ask your operator for access.",
                param="model",
            )


def check_targets(identity: Identity, alias: str, conf: Config) -> None:
    """Refuse an alias none of whose known targets the consumer may reach."""
    providers, regions = identity.allowed_providers, identity.allowed_regions
    if providers is None and regions is None:
        return
    chain = conf.chain(alias) if (alias in conf.aliases or ":" in alias) else ()
    if not chain:
        return  # the router knows the chain; it applies the same facts
    catalog = conf.catalog
    reachable = [
        t
        for t in chain
        if (providers is None or t.partition(":")[0] in providers)
        and (regions is None or catalog.region(t) in regions)
    ]
    if reachable:
        return
    rules = [
        f"{s.path}.{name}"
        for s in identity.rules
        for name, value in (("providers", s.rule.providers), ("regions", s.rule.regions))
        if value is not None
    ]
    raise PermissionDenied(
        f"{_who(identity)} may not reach any provider that serves model {alias!r}: "
        f"{' and '.join(rules)} exclude all of {', '.join(chain)}. Use another model, or ask "
        "your operator for access.",
        param="model",
    )


def compliance_facts(identity: Identity, facts: Facts) -> None:
    """What the router (and the sidecar) must honour for this consumer."""
    if identity.allowed_providers is not None:
        facts["allowed_providers"] = identity.allowed_providers
    if identity.allowed_regions is not None:
        facts["allowed_regions"] = identity.allowed_regions
    if identity.personal_data is not None:
        facts["personal_data_rule"] = identity.personal_data
    facts["log_opt_out"] = identity.log_opt_out
