"""Feature flags: an OpenFeature provider over a YAML flag file, and ``FLAGS`` for the hot path.

``FLAGS.enabled(key, ctx, default)`` and ``FLAGS.variant(key, ctx, default)`` answer from the
flag file named by ``DEEPGATE_FLAGS_FILE``. With no file configured they return ``default`` at
once. The file is re-read when its mtime or size changes (checked at most once a second, on
evaluation; the check is one ``stat``); a file with an error keeps the last good flags and logs
the file, the line and what is wrong. The same flags are served to any OpenFeature client of the
``deepgate`` domain (``openfeature.api.get_client("deepgate")``) by ``FileFlagProvider``.

The file (see docs/flags.md and examples/flags.yaml)::

    flags:
      plugin.deepgate-rag.enabled:
        value: true                       # served when no rule matches
        rules:
          - when: {route: [internal-chat], group: [beta]}   # all keys must match; any item
            value: false
      router.fast.strategy:
        rollout: {cheapest: 90, latency: 10}   # percentages by a stable hash of the consumer
        rules:
          - when: {consumer: [alice]}
            value: latency

The evaluation context is the consumer (OpenFeature's targeting key), the consumer's groups, the
route id and the model alias. A percentage rollout hashes ``flag key + consumer`` (SHA-256), so
one consumer always gets the same variant of a flag, and different flags split independently.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata

log = logging.getLogger("deepgate.flags")

ENV_FILE: Final = "DEEPGATE_FLAGS_FILE"
DOMAIN: Final = "deepgate"
CHECK_INTERVAL_S: Final = 1.0
_BUCKETS: Final = 10_000  # rollout resolution: 0.01 %
_CONTEXT_KEYS: Final = ("consumer", "group", "route", "model")

FlagValue = bool | str


@dataclass(frozen=True, slots=True)
class FlagContext:
    """Who and what a request is: the consumer, its groups, the route id and the model alias."""

    consumer: str | None = None
    groups: tuple[str, ...] = ()
    route: str | None = None
    model: str | None = None

    def to_openfeature(self) -> EvaluationContext:
        attributes: dict[str, Any] = {"groups": list(self.groups)}
        if self.route is not None:
            attributes["route"] = self.route
        if self.model is not None:
            attributes["model"] = self.model
        return EvaluationContext(targeting_key=self.consumer, attributes=attributes)

    @classmethod
    def from_openfeature(cls, ctx: EvaluationContext | None) -> FlagContext:
        if ctx is None:
            return cls()
        attrs = ctx.attributes
        groups = attrs.get("groups") or ()
        if isinstance(groups, str):
            groups = (groups,)
        route = attrs.get("route")
        model = attrs.get("model")
        return cls(
            consumer=ctx.targeting_key,
            groups=tuple(str(g) for g in groups) if isinstance(groups, Sequence) else (),
            route=route if isinstance(route, str) else None,
            model=model if isinstance(model, str) else None,
        )


class FlagFileError(ValueError):
    """The flag file is wrong; the message names the file, the line and the problem."""


# ---------------------------------------------------------------------------------------------
# Compiled flags


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A fixed value, or a rollout: cumulative bucket bounds and their variants."""

    value: FlagValue | None
    bounds: tuple[int, ...] = ()
    variants: tuple[FlagValue, ...] = ()

    def pick(self, flag_key: str, consumer: str | None) -> FlagValue:
        if self.value is not None:
            return self.value
        bucket = _bucket(flag_key, consumer)
        for bound, variant in zip(self.bounds, self.variants, strict=True):
            if bucket < bound:
                return variant
        return self.variants[-1]


@dataclass(frozen=True, slots=True)
class _Rule:
    consumers: frozenset[str] | None
    groups: frozenset[str] | None
    routes: frozenset[str] | None
    models: frozenset[str] | None
    outcome: _Outcome

    def matches(self, ctx: FlagContext) -> bool:
        if self.consumers is not None and ctx.consumer not in self.consumers:
            return False
        if self.groups is not None and self.groups.isdisjoint(ctx.groups):
            return False
        if self.routes is not None and ctx.route not in self.routes:
            return False
        return self.models is None or ctx.model in self.models


@dataclass(frozen=True, slots=True)
class _Flag:
    key: str
    kind: type  # bool or str
    rules: tuple[_Rule, ...]
    fallback: _Outcome | None  # None: the caller's default when no rule matches

    def evaluate(self, ctx: FlagContext) -> tuple[FlagValue | None, str]:
        """(value, reason); value None means "use the caller's default"."""
        for rule in self.rules:
            if rule.matches(ctx):
                outcome = rule.outcome
                reason = Reason.TARGETING_MATCH if outcome.value is not None else Reason.SPLIT
                return outcome.pick(self.key, ctx.consumer), reason
        if self.fallback is None:
            return None, Reason.DEFAULT
        reason = Reason.STATIC if self.fallback.value is not None else Reason.SPLIT
        return self.fallback.pick(self.key, ctx.consumer), reason


def _bucket(flag_key: str, consumer: str | None) -> int:
    digest = hashlib.sha256(f"{flag_key}\x00{consumer or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of each mapping key and sequence item, by path (for error messages)."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value)
                lines[(*path, key)] = key_node.start_mark.line + 1
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


class _Compiler:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = _line_index(text)

    def fail(self, where: tuple[str, ...], problem: str) -> FlagFileError:
        line = None
        probe = where
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe[:-1]
        at = f" line {line}:" if line is not None else ""
        name = f" flag {where[1]}:" if len(where) > 1 and where[0] == "flags" else ""
        return FlagFileError(f"{self.path}:{at}{name} {problem}")

    def compile(self, data: Any) -> dict[str, _Flag]:
        if data is None:
            return {}
        if not isinstance(data, Mapping) or set(data) - {"flags"}:
            raise self.fail((), "the file must be a mapping with one key, flags:")
        flags = data.get("flags") or {}
        if not isinstance(flags, Mapping):
            raise self.fail(("flags",), "flags: must map flag keys to their definitions")
        return {str(k): self.flag(str(k), v) for k, v in flags.items()}

    def flag(self, key: str, spec: Any) -> _Flag:
        where = ("flags", key)
        if not isinstance(spec, Mapping):
            raise self.fail(where, "must be a mapping with value:, rollout: and/or rules:")
        unknown = set(spec) - {"value", "rollout", "rules", "description"}
        if unknown:
            raise self.fail(
                (*where, sorted(unknown)[0]),
                f"unknown key {sorted(unknown)[0]!r} (allowed: value, rollout, rules, description)",
            )
        kinds: set[type] = set()
        fallback = None
        if "value" in spec or "rollout" in spec:
            fallback = self.outcome(where, spec, kinds)
        raw_rules = spec.get("rules") or []
        if not isinstance(raw_rules, list):
            raise self.fail((*where, "rules"), "rules: must be a list of {when:, value:|rollout:}")
        rules = tuple(
            self.rule((*where, "rules", str(i)), r, kinds) for i, r in enumerate(raw_rules)
        )
        if fallback is None and not rules:
            raise self.fail(where, "needs value:, rollout: or rules:")
        if len(kinds) > 1:
            raise self.fail(where, "mixes true/false and string values; a flag has one type")
        kind = kinds.pop() if kinds else bool
        return _Flag(key=key, kind=kind, rules=rules, fallback=fallback)

    def rule(self, where: tuple[str, ...], spec: Any, kinds: set[type]) -> _Rule:
        if not isinstance(spec, Mapping) or "when" not in spec:
            raise self.fail(where, "a rule needs when: and value: or rollout:")
        unknown = set(spec) - {"when", "value", "rollout"}
        if unknown:
            raise self.fail(where, f"unknown key {sorted(unknown)[0]!r} in a rule")
        when = spec["when"]
        if not isinstance(when, Mapping) or not when:
            raise self.fail((*where, "when"), f"when: must map some of {', '.join(_CONTEXT_KEYS)}")
        sets: dict[str, frozenset[str]] = {}
        for name, items in when.items():
            if name not in _CONTEXT_KEYS:
                raise self.fail(
                    (*where, "when", str(name)),
                    f"unknown context key {name!r} (allowed: {', '.join(_CONTEXT_KEYS)})",
                )
            listed = items if isinstance(items, list) else [items]
            if not listed or not all(isinstance(i, str | int) for i in listed):
                raise self.fail(
                    (*where, "when", name), f"{name}: must be a name or a list of names"
                )
            sets[name] = frozenset(str(i) for i in listed)
        return _Rule(
            consumers=sets.get("consumer"),
            groups=sets.get("group"),
            routes=sets.get("route"),
            models=sets.get("model"),
            outcome=self.outcome(where, spec, kinds),
        )

    def outcome(
        self, where: tuple[str, ...], spec: Mapping[str, Any], kinds: set[type]
    ) -> _Outcome:
        if ("value" in spec) == ("rollout" in spec):
            raise self.fail(where, "give exactly one of value: or rollout:")
        if "value" in spec:
            value = spec["value"]
            if not isinstance(value, bool | str):
                raise self.fail((*where, "value"), "value: must be true, false or a string")
            kinds.add(type(value))
            return _Outcome(value=value)
        rollout = spec["rollout"]
        at = (*where, "rollout")
        if not isinstance(rollout, Mapping) or not rollout:
            raise self.fail(at, "rollout: must map variants to percentages, e.g. {a: 90, b: 10}")
        bounds: list[int] = []
        variants: list[FlagValue] = []
        total = 0
        for variant, share in rollout.items():
            if not isinstance(variant, bool | str):
                raise self.fail(at, "rollout variants must be strings or true/false")
            if isinstance(share, bool) or not isinstance(share, int | float) or share < 0:
                raise self.fail(
                    (*at, str(variant)), f"the share of {variant!r} must be a percentage"
                )
            kinds.add(type(variant))
            total += round(share * _BUCKETS / 100)
            bounds.append(total)
            variants.append(variant)
        if total != _BUCKETS:
            raise self.fail(
                at, f"rollout percentages add up to {total * 100 / _BUCKETS:g}, not 100"
            )
        return _Outcome(value=None, bounds=tuple(bounds), variants=tuple(variants))


def compile_flag_file(path: str | Path) -> dict[str, _Flag]:
    """Read and check a flag file; raises FlagFileError (file, line, problem) when it is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise FlagFileError(f"{p}: cannot read the flag file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
        compiler = _Compiler(p, text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise FlagFileError(f"{p}:{where} not valid YAML: {problem}") from None
    return compiler.compile(data)


# ---------------------------------------------------------------------------------------------
# The flag source: the file, reloaded on change


class FlagSource:
    """The compiled flags of one file, re-read when it changes (checked at most every interval)."""

    def __init__(self, path: str | Path, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._flags: dict[str, _Flag] = {}
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self._refresh(force=True)

    def flags(self) -> dict[str, _Flag]:
        if time.monotonic() >= self._next_check:
            self._refresh()
        return self._flags

    def _refresh(self, force: bool = False) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking; serve the current flags meanwhile
        try:
            self._next_check = time.monotonic() + self.check_interval_s
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError as exc:
                stamp = None
                if force or self._stamp is not None:
                    self._report(f"{self.path}: cannot read the flag file ({exc.strerror})")
                self._stamp = None
                return
            if stamp == self._stamp and not force:
                return
            self._stamp = stamp
            try:
                compiled = compile_flag_file(self.path)
            except FlagFileError as exc:
                self._report(str(exc))
                return
            self._flags = compiled
            self.last_error = None
            log.info("flags loaded", extra={"flag_file": str(self.path), "flags": len(compiled)})
        finally:
            self._lock.release()

    def _report(self, problem: str) -> None:
        self.last_error = problem
        kept = len(self._flags)
        log.error("flag file rejected, keeping the last good flags (%d): %s", kept, problem)


# ---------------------------------------------------------------------------------------------
# OpenFeature provider


class FileFlagProvider(AbstractProvider):
    """OpenFeature provider serving a deepgate flag file (boolean and string flags)."""

    def __init__(self, source: FlagSource) -> None:
        super().__init__()
        self.source = source

    def get_metadata(self) -> Metadata:
        return Metadata(name="deepgate-flag-file")

    def get_provider_hooks(self) -> list[Any]:
        return []

    def _resolve(
        self, key: str, default: Any, kind: type, ctx: EvaluationContext | None
    ) -> FlagResolutionDetails[Any]:
        flag = self.source.flags().get(key)
        if flag is None:
            return FlagResolutionDetails(
                value=default, reason=Reason.DEFAULT, error_code=ErrorCode.FLAG_NOT_FOUND
            )
        if flag.kind is not kind:
            return FlagResolutionDetails(
                value=default,
                reason=Reason.ERROR,
                error_code=ErrorCode.TYPE_MISMATCH,
                error_message=f"flag {key} holds {flag.kind.__name__} values",
            )
        value, reason = flag.evaluate(FlagContext.from_openfeature(ctx))
        if value is None:
            return FlagResolutionDetails(value=default, reason=Reason.DEFAULT)
        return FlagResolutionDetails(value=value, reason=reason, variant=str(value))

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, bool, evaluation_context)

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, str, evaluation_context)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, int, evaluation_context)

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self._resolve(flag_key, default_value, float, evaluation_context)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Any,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Any]:
        return self._resolve(flag_key, default_value, dict, evaluation_context)


# ---------------------------------------------------------------------------------------------
# FLAGS: what the plugins, the router and the sidecar call on every request


class Flags:
    """Flag evaluation for deepgate code. ``configure(path)`` or DEEPGATE_FLAGS_FILE name the file.

    ``enabled``/``variant`` evaluate the compiled flags directly (a dict lookup and the rules,
    no allocation): the OpenFeature client API adds tens of microseconds a call, too much for
    every plugin of every request. The same source is registered as the OpenFeature provider of
    the ``deepgate`` domain, so other OpenFeature code sees the same answers.
    """

    def __init__(self) -> None:
        self._source: FlagSource | None = None
        self._resolved = False
        self._lock = threading.Lock()

    def configure(
        self, path: str | Path | None, check_interval_s: float = CHECK_INTERVAL_S
    ) -> None:
        """Serve the flags of ``path`` (None: no flags, every call returns its default)."""
        with self._lock:
            self._source = FlagSource(path, check_interval_s) if path else None
            self._resolved = True
            if self._source is not None:
                api.set_provider(FileFlagProvider(self._source), domain=DOMAIN)
                log.info("flag file configured", extra={"flag_file": str(path)})

    def reset(self) -> None:
        """Forget the configuration: the next call reads DEEPGATE_FLAGS_FILE again (tests)."""
        with self._lock:
            self._source = None
            self._resolved = False

    def _current(self) -> FlagSource | None:
        if not self._resolved:
            self.configure(os.environ.get(ENV_FILE) or None)
        return self._source

    @property
    def configured(self) -> bool:
        """True when a flag file is configured (cheap; callers skip gathering a context if not)."""
        return self._current() is not None

    @property
    def last_error(self) -> str | None:
        source = self._current()
        return source.last_error if source is not None else None

    def defines(self, key: str) -> bool:
        """True when the flag file has ``key`` (callers skip gathering a context otherwise)."""
        source = self._source if self._resolved else self._current()
        return source is not None and key in source.flags()

    def enabled(self, key: str, ctx: FlagContext, default: bool) -> bool:
        source = self._source if self._resolved else self._current()
        if source is None:
            return default
        flag = source.flags().get(key)
        if flag is None or flag.kind is not bool:
            return default
        value, _ = flag.evaluate(ctx)
        return default if value is None else bool(value)

    def variant(self, key: str, ctx: FlagContext, default: str) -> str:
        source = self._source if self._resolved else self._current()
        if source is None:
            return default
        flag = source.flags().get(key)
        if flag is None or flag.kind is not str:
            return default
        value, _ = flag.evaluate(ctx)
        return default if value is None else str(value)


FLAGS: Final = Flags()

__all__ = [
    "DOMAIN",
    "ENV_FILE",
    "FLAGS",
    "FileFlagProvider",
    "FlagContext",
    "FlagFileError",
    "FlagSource",
    "Flags",
    "compile_flag_file",
]
