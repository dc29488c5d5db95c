"""``deepgate-prompt-filter``: clean, decorate, template, bound and screen the prompt.

It works on OpenAI chat bodies and Anthropic messages bodies alike, in this order:

1. size: a body over ``max_body_bytes`` is refused with 413 before it is parsed;
2. templates: a body naming ``template_name`` becomes that template with its ``{{var}}``
   placeholders filled from the body's fields (as APISIX ``ai-prompt-template``);
3. shape: anything that is not a chat body is refused with 400;
4. normalize: NFKC, invisible characters (zero-width, bidi controls, Unicode tags) removed, runs of
   spaces collapsed, so that what later checks and the model see is what a person would read;
5. patterns: the client's text is matched against ``allow_patterns`` / ``deny_patterns`` with
   APISIX ``ai-prompt-guard``'s role and history scope (after normalization, so invisible
   characters cannot split a denied phrase);
6. decorate: ``prepend`` / ``append`` messages go around the client's (as ``ai-prompt-decorator``);
7. count: prompt tokens over ``max_prompt_tokens`` are refused (``context_length_exceeded``).

When nothing changed the request goes on untouched; otherwise the runner sends one Rewrite with
the new body. Errors name the rule that fired, never the text that fired it.
"""

from __future__ import annotations

import collections
import functools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import toktok
from pydantic import Field, PrivateAttr, field_validator, model_validator

from deepgate.chat import Dialect, TextSlot, check_chat_body, text_slots
from deepgate.config import StrictModel
from deepgate.errors import (
    ContentPolicyViolation,
    ContextLengthExceeded,
    InvalidRequest,
    PayloadTooLarge,
)
from plugins.base import PluginConfig, PluginSpec, RequestContext
from plugins.runner.codec import Method, Stop

NAME = "deepgate-prompt-filter"

Encoding = Literal["o200k_base", "cl100k_base"]


class PromptMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(min_length=1)


class TemplateBody(StrictModel):
    model: str | None = None
    messages: list[PromptMessage] = Field(min_length=1)


class Template(StrictModel):
    name: str = Field(min_length=1)
    template: TemplateBody


class NamedPattern(StrictModel):
    name: str = Field(min_length=1)
    pattern: str


@dataclass(frozen=True, slots=True)
class Compiled:
    """What a config compiles to at PrepareConf, for the request path."""

    deny: list[tuple[str, re.Pattern[str]]]
    allow: list[tuple[str, re.Pattern[str]]]
    templates: dict[str, TemplateBody]
    prepend: list[dict[str, str]]
    append: list[dict[str, str]]


class Config(PluginConfig):
    max_body_bytes: int | None = Field(default=None, gt=0)
    max_prompt_tokens: int | None = Field(default=None, gt=0)
    encoding: Encoding | None = None
    normalize: bool = True
    prepend: list[PromptMessage] = Field(default_factory=list)
    append: list[PromptMessage] = Field(default_factory=list)
    templates: list[Template] = Field(default_factory=list)
    deny_patterns: list[str | NamedPattern] = Field(default_factory=list)
    allow_patterns: list[str | NamedPattern] = Field(default_factory=list)
    match_all_roles: bool = False
    match_all_conversation_history: bool = False

    # One private attribute: pydantic reads private attributes slowly, and this is per request.
    _compiled: Compiled = PrivateAttr()

    @field_validator("templates")
    @classmethod
    def _unique_templates(cls, templates: list[Template]) -> list[Template]:
        names = [t.name for t in templates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"template names must be unique; repeated: {', '.join(dupes)}")
        return templates

    @model_validator(mode="after")
    def _compile(self) -> Config:
        # Compiled here, once per prepared conf: a bad regex is a PrepareConf error.
        self._compiled = Compiled(
            deny=_compile_patterns("deny_patterns", self.deny_patterns),
            allow=_compile_patterns("allow_patterns", self.allow_patterns),
            templates={t.name: t.template for t in self.templates},
            prepend=[m.model_dump() for m in self.prepend],
            append=[m.model_dump() for m in self.append],
        )
        if self.max_prompt_tokens:
            for enc in (self.encoding,) if self.encoding else ("o200k_base", "cl100k_base"):
                _counter(enc)("warm up")  # load the vocabulary now, not on a request
        return self


def _compile_patterns(
    field: str, items: list[str | NamedPattern]
) -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for i, item in enumerate(items):
        name, source = (
            (item.name, item.pattern) if isinstance(item, NamedPattern) else (f"{field}[{i}]", item)
        )
        try:
            out.append((name, re.compile(source)))
        except re.error as exc:
            raise ValueError(f"{field}[{i}] is not a valid regular expression: {exc}") from None
    return out


# --- normalization ----------------------------------------------------------------------------

# Characters a reader cannot see but a model or a regex can: zero-width and joiners, soft hyphen,
# bidi embeddings/overrides/isolates, invisible math operators, BOM, Unicode tags.
_INVISIBLE = re.compile(
    "[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
    "\U000e0000-\U000e007f]"
)
# Two or more spaces/tabs after text on a line; leading indentation carries meaning (code, lists).
_SPACE_RUN = re.compile(r"(?<=\S)[^\S\r\n]{2,}")
# Three or more line breaks (blank lines between); the next line keeps its indentation.
_BLANK_LINES = re.compile(r"\r?\n(?:[^\S\r\n]*\r?\n){2,}")


def normalize_text(text: str) -> str:
    """NFKC, invisible characters removed, runs of spaces and blank lines collapsed."""
    if text.isascii():
        if _ascii_clean(text):
            return text  # the common case, without running the regexes
    else:
        text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    text = _SPACE_RUN.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", text)


_ASCII_SPACES_BUT_SPACE_AND_NEWLINES = ("\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")


def _ascii_clean(text: str) -> bool:
    """True when neither whitespace rule can change this ASCII text (cheap substring checks)."""
    return (
        "  " not in text
        and text.count("\n") < 3
        and not any(c in text for c in _ASCII_SPACES_BUT_SPACE_AND_NEWLINES)
    )


# --- templates and decoration -----------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


def render_template(
    name: str, template: TemplateBody, body: dict[str, Any], dialect: Dialect
) -> dict[str, Any]:
    """The chat body a template request stands for."""
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        var = match.group(1)
        value = body.get(var)
        if value is None:
            raise InvalidRequest(
                f"Template {name!r} needs the field {var!r} in the request body.", param=var
            )
        if not isinstance(value, str | int | float | bool):
            raise InvalidRequest(f"Template field {var!r} must be a string or a number.", param=var)
        used.add(var)
        return str(value)

    messages = [
        {"role": m.role, "content": _PLACEHOLDER.sub(fill, m.content)} for m in template.messages
    ]
    out = {k: v for k, v in body.items() if k not in used and k != "template_name"}
    out["model"] = template.model or body.get("model")
    out["messages"] = []
    _decorate(out, dialect, [], messages)
    return out


def _decorate(
    body: dict[str, Any],
    dialect: Dialect,
    before: list[dict[str, str]],
    after: list[dict[str, str]],
) -> None:
    """Put messages around the conversation; Anthropic keeps system text in ``system``."""
    if dialect == "anthropic":
        sys_before = [m["content"] for m in before if m["role"] in ("system", "developer")]
        sys_after = [m["content"] for m in after if m["role"] in ("system", "developer")]
        if sys_before or sys_after:
            current = body.get("system")
            if isinstance(current, list):
                current = [{"type": "text", "text": t} for t in sys_before] + current
                current += [{"type": "text", "text": t} for t in sys_after]
            else:
                current = "\n\n".join([*sys_before, *([current] if current else []), *sys_after])
            body["system"] = current
        before = [m for m in before if m["role"] in ("user", "assistant")]
        after = [m for m in after if m["role"] in ("user", "assistant")]
    body["messages"] = [*before, *body["messages"], *after]


# --- screening and counting -------------------------------------------------------------------


def _screened_text(body: dict[str, Any], dialect: Dialect, conf: Config) -> str | None:
    """The text patterns apply to, with ai-prompt-guard's scope; ``None`` when out of scope."""
    messages = body["messages"]
    last = len(messages) - 1
    if not conf.match_all_roles and messages[last].get("role") != "user":
        return None
    parts = []
    for slot in text_slots(body, dialect):
        if not conf.match_all_conversation_history and slot.index != last:
            continue
        if not conf.match_all_roles and slot.role != "user":
            continue
        parts.append(slot.text)
    return " ".join(parts)


def _screen(text: str, compiled: Compiled) -> None:
    if compiled.allow and not any(p.search(text) for _, p in compiled.allow):
        raise ContentPolicyViolation(
            "The request does not match any pattern this route allows (allow_patterns)."
        )
    for name, pattern in compiled.deny:
        if pattern.search(text):
            raise ContentPolicyViolation(
                f"The request was refused by the prompt filter rule {name!r}. Rephrase it, or "
                "ask the route's operator about the rule."
            )


_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada")


def encoding_for(model: str) -> Encoding:
    """The tokenizer of an OpenAI model; o200k_base for models it does not know."""
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


@functools.cache
def _counter(encoding: Encoding) -> Callable[[str], int]:
    """Token counting for one encoding, loaded once, remembering the counts of long texts.

    ``batch_count`` looks up the machine's parallelism on every call; the encoding's own
    ``count`` does not, and gives the same numbers (tests hold both to tiktoken).
    """
    loaded = getattr(toktok, "_encoding", None)
    if loaded is not None:
        count: Callable[[str], int] = loaded(encoding).count
    else:
        count = lambda text: int(toktok.batch_count([text], encoding, threads=1)[0])  # noqa: E731
    return _Remembered(count)


class _Remembered:
    """Token counts of recent long texts. A conversation resends its system prompt and its
    history on every turn, and an application one system prompt with every request: each is
    counted once (hashing a text costs a fraction of tokenizing it). Short texts are counted
    every time; the table keeps the most recent ``size`` texts."""

    MIN_CHARS = 256
    MAX_CHARS = 64 * 1024

    def __init__(self, count: Callable[[str], int], size: int = 4096) -> None:
        self._count = count
        self._size = size
        # An OrderedDict: dropping its oldest entry is O(1), where a plain dict's first key is
        # found by skipping every entry deleted before it.
        self._known: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __call__(self, text: str) -> int:
        if not self.MIN_CHARS <= len(text) <= self.MAX_CHARS:
            return self._count(text)
        known = self._known
        found = known.get(text)
        if found is None:
            found = known[text] = self._count(text)
            if len(known) > self._size:
                known.popitem(last=False)  # the oldest
        return found


# OpenAI's accounting: a few tokens of framing per message, and 3 to prime the answer.
_TOKENS_PER_MESSAGE = 3
_TOKENS_REPLY_PRIMING = 3


def count_prompt_tokens(
    body: dict[str, Any],
    dialect: Dialect,
    encoding: Encoding,
    slots: list[TextSlot] | None = None,
) -> int:
    """Prompt tokens as the provider bills them (text and tool definitions; images excluded).
    ``slots``: the body's ``text_slots`` when the caller has them already."""
    texts = [slot.text for slot in (text_slots(body, dialect) if slots is None else slots)]
    tools = body.get("tools")
    if tools:
        texts.append(orjson.dumps(tools).decode())
    count = _counter(encoding)
    counted = sum(count(text) for text in texts)
    return counted + _TOKENS_PER_MESSAGE * len(body["messages"]) + _TOKENS_REPLY_PRIMING


# --- the handler ------------------------------------------------------------------------------


async def on_request(ctx: RequestContext, conf: Config) -> Stop | None:
    if ctx.call.method in (Method.GET, Method.HEAD, Method.DELETE, Method.OPTIONS):
        return None  # no prompt on these routes (e.g. GET /v1/models)
    raw = await ctx.body()
    if conf.max_body_bytes is not None and len(raw) > conf.max_body_bytes:
        raise PayloadTooLarge(
            f"The request body is {len(raw)} bytes; this route accepts at most "
            f"{conf.max_body_bytes}. Send fewer or shorter messages."
        )
    body = await ctx.json()
    compiled: Compiled = conf.private("_compiled")
    changed = False
    if compiled.templates and isinstance(body, dict) and "template_name" in body:
        name = body["template_name"]
        template = compiled.templates.get(name) if isinstance(name, str) else None
        if template is None:
            raise InvalidRequest(
                f"Unknown template_name; this route has: {', '.join(sorted(compiled.templates))}.",
                param="template_name",
            )
        body = check_chat_body(render_template(name, template, body, ctx.dialect), ctx.dialect)
        changed = True
    else:
        body = await ctx.chat()

    if conf.normalize:
        for slot in text_slots(body, ctx.dialect) if changed else await ctx.slots():
            old = slot.text
            new = normalize_text(old)
            if new != old:
                slot.text = new
                changed = True

    if compiled.allow or compiled.deny:
        text = _screened_text(body, ctx.dialect, conf)
        if text is not None:
            _screen(text, compiled)

    if compiled.prepend or compiled.append:
        # copies: the body goes on to later plugins, which must not edit this config
        _decorate(
            body,
            ctx.dialect,
            [dict(m) for m in compiled.prepend],
            [dict(m) for m in compiled.append],
        )
        changed = True

    if conf.max_prompt_tokens is not None:
        tokens = ctx.facts.get("prompt_tokens")
        if tokens is None or changed or conf.encoding is not None:
            # Not counted yet (policy counts the body as the client sent it, with the model's
            # own encoding), or counted before this plugin changed the body.
            encoding = conf.encoding or encoding_for(body["model"])
            tokens = count_prompt_tokens(body, ctx.dialect, encoding)
        if tokens > conf.max_prompt_tokens:
            raise ContextLengthExceeded(
                f"This request has {tokens} prompt tokens; this route allows at most "
                f"{conf.max_prompt_tokens}. Shorten the messages.",
                param="messages",
            )

    if changed:
        ctx.replace_json(body)
    return None


SPEC = PluginSpec(name=NAME, config=Config, on_request=on_request, wants_body=True)
