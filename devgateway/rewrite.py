"""APISIX's ``response-rewrite`` plugin: change the status, headers and body of a route's answers.

APISIX runs it in the header and body filters, so it sees every response of the route: the
upstream's, and the ones key-auth, client-control or an ext-plugin Stop ended early (our configs
rely on that to give key-auth's 401 the body each SDK expects). In its header filter it evaluates
``vars`` against the response, then sets ``status_code``, drops Content-Length (and
Content-Encoding, Last-Modified, ETag) when it replaces the body, and applies ``headers`` in
APISIX's order: ``add``, then ``set``, then ``remove``; header values may name variables
(``$remote_addr``). The old flat ``headers`` map is ``set`` (an empty value removes the header).
``filters`` (PCRE substitutions) are not imitated and stop start-up.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devgateway import expr, variables
from devgateway.responses import Reply

if TYPE_CHECKING:
    from devgateway.conf import ResponseRewrite

Lookup = Callable[[str], str | None]

_ADD = re.compile(r"^([^:\s]+)\s*:\s*([^:]+)$")  # APISIX's parse of a headers.add entry
_VAR = re.compile(r"(?<!\\)\$\{?(\w+)\}?")  # core.utils.resolve_var's $name / ${name}
_BODY_HEADERS = ("Content-Length", "Content-Encoding", "Last-Modified", "ETag")


@dataclass(frozen=True, slots=True)
class Rule:
    when: expr.Group | None
    status: int | None
    add: tuple[tuple[str, str], ...]
    set: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]
    body: bytes | None
    warnings: tuple[str, ...] = ()


def _header_value(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: a header value must be a string or a number")
    for name in _VAR.findall(str(value)):
        if not variables.is_known(name):
            raise ValueError(f"{where}: variable ${name} is not imitated by devgateway")
    return str(value)


def _header_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"{where}: {name!r} is not a header name")
    return name


def _headers(raw: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    ops = ("add", "set", "remove")
    if not any(isinstance(raw.get(op), list | dict) for op in ops):
        # The old form: a flat map of headers to set.
        if not raw:
            raise ValueError("headers: give at least one header")
        return (
            [],
            [
                (_header_name(k, "headers"), _header_value(v, f"headers.{k}"))
                for k, v in raw.items()
            ],
            [],
        )
    unknown = [k for k in raw if k not in ops]
    if unknown:
        raise ValueError(f"headers.{unknown[0]}: unsupported key; use add, set and remove")
    add: list[tuple[str, str]] = []
    for i, item in enumerate(raw.get("add") or []):
        match = _ADD.match(item) if isinstance(item, str) else None
        if match is None or item.endswith("/"):
            raise ValueError(f"headers.add[{i}]: write 'Name: value' (the value without ':')")
        add.append((match[1], _header_value(match[2], f"headers.add[{i}]")))
    setting = raw.get("set") or {}
    if not isinstance(setting, dict):
        raise ValueError("headers.set: a map of header names to values")
    set_ = [
        (_header_name(k, "headers.set"), _header_value(v, f"headers.set.{k}"))
        for k, v in setting.items()
    ]
    remove = [
        _header_name(n, f"headers.remove[{i}]") for i, n in enumerate(raw.get("remove") or [])
    ]
    return add, set_, remove


def compile_rule(conf: ResponseRewrite) -> Rule:
    """The rule for a route, or ``ValueError`` / ``ExprError`` naming what is wrong."""
    when = expr.compile_vars(conf.vars or [])
    for name in expr.variables(when):
        if not variables.is_known(name):
            raise ValueError(f"vars: variable {name!r} is not imitated by devgateway")
    add, set_, remove = _headers(conf.headers) if conf.headers is not None else ([], [], [])
    body: bytes | None = None
    if conf.body_base64:
        try:
            body = base64.b64decode(conf.body or "", validate=True)
        except (binascii.Error, ValueError):
            body = None
        if not conf.body or body is None:
            raise ValueError("body_base64: body is not valid base64 content")
    elif conf.body is not None:
        body = conf.body.encode()
    return Rule(
        when=when,
        status=conf.status_code,
        add=tuple(add),
        set=tuple(set_),
        remove=tuple(remove),
        body=body,
        warnings=tuple(expr.warnings(when)),
    )


def resolve(template: str, lookup: Lookup) -> str:
    """``$name`` and ``${name}`` replaced by the variable (empty when unset); ``\\$`` is ``$``."""
    if "$" not in template:
        return template
    return _VAR.sub(lambda m: lookup(m[1]) or "", template).replace("\\$", "$")


def apply(rule: Rule, reply: Reply, lookup: Lookup) -> bool:
    """Rewrite ``reply`` if the rule's ``vars`` hold for it (``lookup("status")`` included)."""
    if not expr.evaluate(rule.when, lookup):
        return False
    if rule.status is not None:
        reply.status = rule.status
    headers = reply.headers
    if rule.body is not None:
        for name in _BODY_HEADERS:
            headers.popall(name, None)
    for name, value in rule.add:
        headers.add(name, resolve(value, lookup))
    for name, value in rule.set:
        resolved = resolve(value, lookup)
        if resolved == "":
            headers.popall(name, None)
        else:
            headers[name] = resolved
    for name in rule.remove:
        headers.popall(name, None)
    if rule.body is not None:
        reply.replace_body(rule.body)
    return True
