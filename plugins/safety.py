"""``deepgate-safety``: screen the prompt, then block it, redact or mask parts of it, or log.

The detectors are the shared ones of ``deepgate.safety`` (obfuscation, injection rules, personal
data, secrets), built once when APISIX prepares the route's conf, plus three that only the request
side has:

- the pool's classifier (gRPC ``Classify`` through ``LINK``) as the second half of ``injection``;
- ``topics``: the prompt's embedding (gRPC ``Embed``) against configured topic phrases, whose
  vectors are embedded once, on first use, and kept;
- ``patterns``: allow / deny regexes with APISIX ``ai-prompt-guard`` semantics, compiled the way
  ``deepgate-prompt-filter`` compiles its own.

Every detector reads the messages of its scope (roles; the last message or the whole history).
The cheap rules run first; a block there answers 400 ``content_policy_violation`` at once, naming
the detector and rule, never the text. Only then does the plugin wait on the pool, with each
model's own deadline and ``on_error``. Redactions and masks rewrite the body; masks leave their
placeholder -> original table in ``ctx.facts["restore"]`` for the sidecar to put back in the
answer, and the ``output`` block goes to the sidecar as ``ctx.facts["safety_output"]``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from deepgate.chat import TextSlot
from deepgate.config import StrictModel
from deepgate.errors import ContentPolicyViolation, DeepgateError, ServiceUnavailable
from deepgate.flags import FLAGS
from deepgate.safety import (
    Action,
    Detector,
    DetectorsConfig,
    Finding,
    Masker,
    Scope,
    build_detectors,
    redact,
    redaction_label,
)
from deepgate.safety.config import ClassifierConfig, DetectorConfig
from plugins.base import PluginConfig, PluginSpec, RequestContext
from plugins.prompt_filter import NamedPattern, _compile_patterns
from plugins.runner.codec import Method, Stop
from plugins.sidecar_link import LINK

NAME = "deepgate-safety"
log = logging.getLogger(__name__)


# --- config -----------------------------------------------------------------------------------


class Topic(StrictModel):
    name: str = Field(min_length=1)
    phrases: list[str] = Field(min_length=1)


class TopicsConfig(DetectorConfig):
    """Banned topics: cosine similarity of the prompt to each topic's phrases."""

    threshold: float = Field(default=0.6, ge=0.0, le=1.0)
    topics: list[Topic] = Field(min_length=1)
    timeout_ms: int = Field(default=300, gt=0, le=10_000)
    on_error: Literal["open", "closed"] = "open"
    model: str = "all-MiniLM-L6-v2"

    @model_validator(mode="after")
    def _whole_text_actions(self) -> TopicsConfig:
        if self.action not in ("block", "log"):
            raise ValueError("topics.action must be 'block' or 'log' (a topic has no span)")
        return self


class PatternsConfig(StrictModel):
    """Allow / deny regexes, scoped as APISIX ``ai-prompt-guard`` scopes them."""

    action: Literal["block", "redact", "log"] = "block"
    allow_patterns: list[str | NamedPattern] = Field(default_factory=list)
    deny_patterns: list[str | NamedPattern] = Field(default_factory=list)
    match_all_roles: bool = False
    match_all_conversation_history: bool = False


@dataclass(frozen=True, slots=True)
class Compiled:
    """What a config compiles to at PrepareConf, for the request path."""

    detectors: tuple[Detector, ...]
    actions: dict[str, Action]  # detector name -> action (also for the pool's detectors)
    classifier: ClassifierConfig | None
    classifier_scope: Scope
    topics: TopicsConfig | None
    output: dict[str, Any] | None


class Config(PluginConfig, DetectorsConfig):
    topics: TopicsConfig | None = None
    patterns: PatternsConfig | None = None
    output: DetectorsConfig | None = None  # run by the sidecar on the answer

    _compiled: Compiled = PrivateAttr()

    @model_validator(mode="after")
    def _compile(self) -> Config:
        # Built here, once per prepared conf: Presidio, spaCy and detect-secrets load now, and a
        # bad regex is a PrepareConf error.
        detectors = build_detectors(
            DetectorsConfig(
                obfuscation=self.obfuscation,
                injection=self.injection,
                personal_data=self.personal_data,
                secrets=self.secrets,
            )
        )
        if self.patterns is not None:
            detectors.insert(0, PatternScreen.build(self.patterns))
        if self.output is not None:
            build_detectors(self.output)  # the sidecar builds them again; fail here, not there
        actions = {d.name: d.action for d in detectors}
        if self.injection is not None:  # the classifier reports as injection, rules on or off
            actions[INJECTION] = self.injection.action
        if self.topics is not None:
            actions[TOPICS] = self.topics.action
        self._compiled = Compiled(
            detectors=tuple(detectors),
            actions=actions,
            classifier=self.injection.classifier if self.injection else None,
            classifier_scope=self.injection.scope() if self.injection else Scope(),
            topics=self.topics,
            output=(
                self.output.model_dump(mode="json", exclude_unset=True) if self.output else None
            ),
        )
        return self


# --- patterns: ai-prompt-guard semantics --------------------------------------------------------

PATTERNS = "patterns"
TOPICS = "topics"
INJECTION = "injection"


@dataclass(frozen=True, slots=True)
class PatternScreen:
    """Deny patterns find spans; allow patterns, when there are any, must match the text.

    Scope as ai-prompt-guard: the last message only, and only when it is the user's, unless
    ``match_all_conversation_history`` / ``match_all_roles`` widen it.
    """

    action: Action
    scope: Scope
    allow: tuple[tuple[str, Any], ...]
    deny: tuple[tuple[str, Any], ...]
    name: str = PATTERNS
    slow: bool = False

    @classmethod
    def build(cls, conf: PatternsConfig) -> PatternScreen:
        roles = (
            ("system", "developer", "user", "assistant", "tool", "function")
            if conf.match_all_roles
            else ("user",)
        )
        scope = Scope(roles, "all" if conf.match_all_conversation_history else "last")
        return cls(
            conf.action,
            scope,
            tuple(_compile_patterns("allow_patterns", conf.allow_patterns)),
            tuple(_compile_patterns("deny_patterns", conf.deny_patterns)),
        )

    def scan(self, text: str) -> list[Finding]:
        out = [
            Finding(self.name, name, m.start(), m.end(), 1.0)
            for name, pattern in self.deny
            for m in pattern.finditer(text)
        ]
        return out

    def applies(self, last_role: str | None) -> bool:
        """ai-prompt-guard screens nothing when the last message is not the user's."""
        return self.scope.roles != ("user",) or last_role == "user"

    def not_allowed(self, texts: Sequence[str]) -> bool:
        """True when allow patterns exist and none matches the scoped text (as one text)."""
        if not self.allow:
            return False
        joined = " ".join(texts)
        return not any(p.search(joined) for _, p in self.allow)


# --- scope ------------------------------------------------------------------------------------


def _in_scope(slot: TextSlot, scope: Scope, last: int) -> bool:
    return slot.role in scope.roles and (scope.history == "all" or slot.index == last)


def _scoped(slots: Sequence[TextSlot], scope: Scope, last: int) -> list[TextSlot]:
    return [s for s in slots if _in_scope(s, scope, last)]


# --- the pool's detectors ---------------------------------------------------------------------


# The pool's models read about 256 tokens of a text, and a long text dilutes one bad sentence
# (an injection is often appended to a long, harmless text). A short text goes whole; a longer
# one goes as sentences, short ones packed together up to WINDOW_CHARS, at most WINDOWS_MAX
# pieces in one batch: the first few and the rest from the end.
WINDOW_CHARS = 400
WINDOWS_MAX = 16
_HEAD_WINDOWS = 4
_SENTENCE_END = re.compile("(?<=[.!?\u3002\uff01\uff1f])\\s+|\n+")


def windows(text: str) -> list[str]:
    """``text`` as the pieces the pool's models score (the caller takes the highest score)."""
    if len(text) <= WINDOW_CHARS:
        return [text]
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        if not sentence.strip():
            continue
        while len(sentence) > WINDOW_CHARS:  # a run-on "sentence": cut it
            if current:
                pieces.append(current)
                current = ""
            pieces.append(sentence[:WINDOW_CHARS])
            sentence = sentence[WINDOW_CHARS:]
        if current and len(current) + 1 + len(sentence) > WINDOW_CHARS // 4:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    if len(pieces) > WINDOWS_MAX:
        pieces = pieces[:_HEAD_WINDOWS] + pieces[-(WINDOWS_MAX - _HEAD_WINDOWS) :]
    return pieces


async def _classify(conf: ClassifierConfig, text: str) -> list[Finding]:
    results = await LINK.classify(windows(text), conf.timeout_ms / 1000, model=conf.model)
    out = []
    injection = max(r.get("prompt_injection", 0.0) for r in results)
    if injection >= conf.threshold:
        out.append(Finding(INJECTION, "classifier", 0, len(text), injection))
    unsafe = max(r.get("unsafe", 0.0) for r in results)
    if conf.unsafe_threshold is not None and unsafe >= conf.unsafe_threshold:
        out.append(Finding(INJECTION, "classifier_unsafe", 0, len(text), unsafe))
    return out


class TopicVectors:
    """Each topic phrase's embedding, computed on first use and kept for the process."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, tuple[str, ...]], asyncio.Future[list[list[float]]]] = {}

    async def get(
        self, model: str, phrases: tuple[str, ...], timeout_s: float
    ) -> list[list[float]]:
        key = (model, phrases)
        future = self._known.get(key)
        if future is None or (future.done() and (future.cancelled() or future.exception())):
            future = asyncio.ensure_future(LINK.embed(list(phrases), timeout_s, model=model))
            self._known[key] = future
        return await asyncio.shield(future)


TOPIC_VECTORS = TopicVectors()


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    return dot / norm if norm else 0.0


async def _topics(conf: TopicsConfig, text: str) -> list[Finding]:
    phrases = tuple(p for t in conf.topics for p in t.phrases)
    owners = [t.name for t in conf.topics for _ in t.phrases]
    timeout_s = conf.timeout_ms / 1000
    vectors = await TOPIC_VECTORS.get(conf.model, phrases, timeout_s)
    prompts = await LINK.embed(windows(text), timeout_s, model=conf.model)
    best: dict[str, float] = {}
    for owner, vector in zip(owners, vectors, strict=True):
        for prompt in prompts:
            best[owner] = max(best.get(owner, -1.0), _cosine(prompt, vector))
    return [
        Finding(TOPICS, owner, 0, len(text), score)
        for owner, score in best.items()
        if score >= conf.threshold
    ]


async def _guarded(what: str, on_error: Literal["open", "closed"], call: Any) -> list[Finding]:
    """The pool detector's findings; on a pool failure, none (open) or a 503 (closed)."""
    try:
        found: list[Finding] = await call
    except DeepgateError as err:
        if on_error == "open":
            log.warning("safety %s unavailable (%s); on_error=open, going on", what, err.code)
            return []
        raise ServiceUnavailable(
            f"The safety check {what!r} could not run: the inference pool did not answer. "
            "Retry shortly; if it persists, the gateway's operator should check the sidecar.",
            retry_after=1,
        ) from None
    return found


# --- the handler ------------------------------------------------------------------------------


def _refuse(findings: Iterable[Finding]) -> ContentPolicyViolation:
    first = next(iter(findings))
    return ContentPolicyViolation(
        f"The request was refused by the safety check {first.detector!r} ({first.label}). "
        "Remove that content and try again, or ask the route's operator about the check."
    )


async def _scan_rules(
    slots: Sequence[TextSlot], last: int, detectors: Sequence[Detector]
) -> list[tuple[TextSlot, Finding]]:
    hits: list[tuple[TextSlot, Finding]] = []
    scoped: dict[Scope, list[TextSlot]] = {}  # detectors mostly share one scope
    for detector in detectors:
        in_scope = scoped.get(detector.scope)
        if in_scope is None:
            in_scope = scoped[detector.scope] = _scoped(slots, detector.scope, last)
        for slot in in_scope:
            if detector.slow:
                found = await asyncio.to_thread(detector.scan, slot.text)
            else:
                found = detector.scan(slot.text)
            hits.extend((slot, f) for f in found)
    return hits


DETECTOR_FLAGS = {
    name: f"safety.{name}.enabled"
    for name in (INJECTION, "secrets", "personal_data", "obfuscation", PATTERNS, TOPICS)
}


async def _switched_off(ctx: RequestContext) -> set[str]:
    """Detectors a flag file switches off for this request (``safety.<detector>.enabled``)."""
    flagged = {name: key for name, key in DETECTOR_FLAGS.items() if FLAGS.defines(key)}
    if not flagged:
        return set()
    who = await ctx.flag_context()
    return {name for name, key in flagged.items() if not FLAGS.enabled(key, who, True)}


async def on_request(ctx: RequestContext, conf: Config) -> Stop | None:
    if ctx.call.method in (Method.GET, Method.HEAD, Method.DELETE, Method.OPTIONS):
        return None
    compiled: Compiled = conf.private("_compiled")
    body = await ctx.chat()
    slots = await ctx.slots()
    last = len(body["messages"]) - 1
    actions = compiled.actions

    detectors = compiled.detectors
    classifier, topics = compiled.classifier, compiled.topics
    off: set[str] = set()
    if FLAGS.configured:
        off = await _switched_off(ctx)
        detectors = tuple(d for d in detectors if d.name not in off)
        classifier = None if INJECTION in off else classifier
        topics = None if TOPICS in off else topics
    screen = detectors[0] if detectors and isinstance(detectors[0], PatternScreen) else None
    if screen is not None and not screen.applies(body["messages"][last].get("role")):
        detectors = detectors[1:]
        screen = None
    hits = await _scan_rules(slots, last, detectors)
    if screen is not None:
        scoped = [s.text for s in _scoped(slots, screen.scope, last)]
        if scoped and screen.not_allowed(scoped):
            # nothing to redact when nothing allowed matched: only 'log' lets it through
            label = "not_allowed"
            if screen.action != "log":
                raise _refuse([Finding(PATTERNS, label, 0, 0, 1.0)])
            hits.append((slots[-1], Finding(PATTERNS, label, 0, 0, 1.0)))
    blocking = [f for _, f in hits if actions[f.detector] == "block"]
    if blocking:
        _log_findings(ctx, [f for _, f in hits])
        raise _refuse(blocking)

    pool: list[Any] = []
    if classifier is not None:
        text = "\n".join(s.text for s in _scoped(slots, compiled.classifier_scope, last))
        if text:
            c = classifier
            pool.append(_guarded("injection classifier", c.on_error, _classify(c, text)))
    if topics is not None:
        t = topics
        text = "\n".join(s.text for s in _scoped(slots, t.scope(), last))
        if text:
            pool.append(_guarded(TOPICS, t.on_error, _topics(t, text)))
    whole_text: list[Finding] = []
    # Both answers are awaited before either error is raised: no call is left running unheard.
    for found in await asyncio.gather(*pool, return_exceptions=True) if pool else ():
        if isinstance(found, BaseException):
            raise found
        whole_text.extend(found)
    if whole_text:
        _log_findings(ctx, [*(f for _, f in hits), *whole_text])
        # A score is about the whole text: there is no span to redact, so redact blocks too.
        blocking = [f for f in whole_text if actions[f.detector] in ("block", "redact")]
        if blocking:
            raise _refuse(blocking)
    elif hits:
        _log_findings(ctx, [f for _, f in hits])

    _rewrite(ctx, body, hits, actions)
    _record(ctx, compiled, [*(f for _, f in hits), *whole_text], off)
    return None


def _rewrite(
    ctx: RequestContext,
    body: dict[str, Any],
    hits: list[tuple[TextSlot, Finding]],
    actions: dict[str, Action],
) -> None:
    """Redact and mask the spans that call for it, slot by slot; one Rewrite of the body."""
    by_slot: dict[int, tuple[TextSlot, list[Finding]]] = {}
    for slot, f in hits:
        if actions[f.detector] in ("redact", "mask") and f.end > f.start:
            by_slot.setdefault(id(slot), (slot, []))[1].append(f)
    if not by_slot:
        return
    masker = Masker()

    def replace(f: Finding, original: str) -> str:
        if actions[f.detector] == "mask":
            return masker.placeholder(f, original)
        return redaction_label(f)

    for slot, found in by_slot.values():
        slot.text = redact(slot.text, found, replace)
    if masker.restore:
        ctx.facts["restore"] = {**ctx.facts.get("restore", {}), **masker.restore}
    ctx.replace_json(body)


def _record(
    ctx: RequestContext, compiled: Compiled, findings: list[Finding], off: set[str]
) -> None:
    if compiled.output is not None:
        # A detector a flag switched off for this request is off for its answer too.
        output = {k: v for k, v in compiled.output.items() if k not in off}
        if output:
            ctx.facts["safety_output"] = output
    if not findings:
        return
    fired = sorted({f.detector for f in findings})
    ctx.facts["findings"] = sorted({*ctx.facts.get("findings", []), *fired})
    if any(f.detector == "personal_data" for f in findings):
        ctx.facts["personal_data_found"] = True


def _log_findings(ctx: RequestContext, findings: list[Finding]) -> None:
    # Detector and rule names only: the matched text is the very thing not to write down.
    log.info(
        "safety findings on request %s: %s",
        ctx.request_id,
        ", ".join(sorted({f"{f.detector}:{f.label}" for f in findings})),
    )


SPEC = PluginSpec(name=NAME, config=Config, on_request=on_request, wants_body=True)
