"""The canonical chat types: the OpenAI Chat Completions shape, defined once.

Every part of deepgate speaks this shape internally. Clients may also send Anthropic Messages
bodies; ``from_anthropic`` reads one into the canonical request so that the rest of the product
never needs a second schema.

Two ways in, on purpose:

- the models below (``ChatRequest``, ``ChatResponse``, ``ChatChunk``) validate a whole body and
  are what adapters and services use;
- ``check_chat_body`` and ``text_slots`` work on the parsed JSON dict itself. The plugin runner
  uses them on the hot path: it must not rebuild a rich model of every request, and a rewrite must
  keep every field the client sent, even ones this module has never heard of.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from deepgate.errors import InvalidRequest

Dialect = Literal["openai", "anthropic"]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Open(BaseModel):
    """Canonical models keep fields they do not name: providers add new ones all the time."""

    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Open):
    type: Literal["text"] = "text"
    text: str


class ImagePart(_Open):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class FunctionCall(_Open):
    name: str
    arguments: str = ""


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatMessage(_Open):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        """The message's text parts joined, for counting and checking."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatRequest(_Open):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def output_budget(self) -> int | None:
        """The most tokens the client allows the answer (``max_completion_tokens`` wins)."""
        return self.max_completion_tokens or self.max_tokens


class PromptTokensDetails(_Open):
    cached_tokens: int | None = None


class CompletionTokensDetails(_Open):
    reasoning_tokens: int | None = None


class Usage(_Open):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class Choice(_Open):
    index: int = 0
    message: ChatMessage
    finish_reason: FinishReason | None = None


class ChatResponse(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Delta(_Open):
    role: Role | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ChunkChoice(_Open):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --- the hot path: checks and text access on the parsed dict -------------------------------

_OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_ANTHROPIC_ROLES = frozenset({"user", "assistant"})


def dialect_for_path(path: str) -> Dialect:
    """Which wire format a route speaks: Anthropic Messages under ``.../messages``."""
    found = _dialects.get(path)
    if found is None:
        found = "anthropic" if "messages" in path.split("/") else "openai"
        if len(_dialects) < 1024:  # a gateway has a handful of paths; clients cannot grow it
            _dialects[path] = found
    return found


_dialects: dict[str, Dialect] = {}


def check_chat_body(body: Any, dialect: Dialect) -> dict[str, Any]:
    """Return ``body`` if it is a chat request of ``dialect``, else raise ``InvalidRequest``.

    Only the structure every later step relies on is checked; unknown fields pass through.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter 'model' (a string).", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "Missing required parameter 'messages' (a non-empty array).", param="messages"
        )
    roles = _ANTHROPIC_ROLES if dialect == "anthropic" else _OPENAI_ROLES
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in roles:
            raise InvalidRequest(
                f"messages[{i}] must be an object whose 'role' is one of {sorted(roles)}.",
                param=f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )
    if dialect == "anthropic":
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise InvalidRequest(
                "'system' must be a string or an array of text blocks.", param="system"
            )
    return body


class TextSlot:
    """One place in a chat body that holds prompt text: read it, and write it back in place."""

    __slots__ = ("container", "index", "key", "role")

    def __init__(self, role: str, index: int, container: dict[str, Any], key: str) -> None:
        self.role = role
        self.index = index  # the message's position; -1 for Anthropic's top-level system
        self.container = container
        self.key = key

    @property
    def text(self) -> str:
        value = self.container[self.key]
        return value if isinstance(value, str) else ""

    @text.setter
    def text(self, value: str) -> None:
        self.container[self.key] = value


def _part_slots(role: str, index: int, parts: list[Any]) -> Iterator[TextSlot]:
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            yield TextSlot(role, index, part, "text")
        elif kind == "tool_result":  # Anthropic: a tool's answer, text or blocks
            inner = part.get("content")
            if isinstance(inner, str):
                yield TextSlot("tool", index, part, "content")
            elif isinstance(inner, list):
                yield from _part_slots("tool", index, inner)


def text_slots(body: dict[str, Any], dialect: Dialect) -> Iterator[TextSlot]:
    """Every prompt text in a checked chat body, in conversation order.

    Anthropic's top-level ``system`` comes first with role ``system`` and index -1.
    """
    if dialect == "anthropic":
        system = body.get("system")
        if isinstance(system, str):
            yield TextSlot("system", -1, body, "system")
        elif isinstance(system, list):
            yield from _part_slots("system", -1, system)
    for i, msg in enumerate(body["messages"]):
        role = msg["role"]
        content = msg.get("content")
        if isinstance(content, str):
            yield TextSlot(role, i, msg, "content")
        elif isinstance(content, list):
            yield from _part_slots(role, i, content)


# --- Anthropic Messages -> canonical ----------------------------------------------------------


def _anthropic_image(block: dict[str, Any]) -> ImagePart:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    else:
        url = str(source.get("url", ""))
    return ImagePart(image_url=ImageURL(url=url))


def _anthropic_message(msg: dict[str, Any]) -> list[ChatMessage]:
    """One Anthropic message can become several canonical ones (tool results are messages)."""
    role = msg["role"]
    content = msg.get("content")
    if isinstance(content, str):
        return [ChatMessage(role=role, content=content)]
    parts: list[ContentPart] = []
    calls: list[ToolCall] = []
    out: list[ChatMessage] = []
    for block in content or []:
        if not isinstance(block, dict):
            raise InvalidRequest("Each content block must be an object with a 'type'.")
        kind = block.get("type")
        if kind == "text":
            parts.append(TextPart(text=block.get("text", "")))
        elif kind == "image":
            parts.append(_anthropic_image(block))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise InvalidRequest("A tool_use block needs a string 'id' and 'name'.")
            args = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                ToolCall(id=block["id"], function=FunctionCall(name=block["name"], arguments=args))
            )
        elif kind == "tool_result":
            inner = block.get("content")
            if isinstance(inner, list):
                inner = "\n".join(
                    b.get("text", "")
                    for b in inner
                    if isinstance(b, dict) and b.get("type") == "text"
                )
            out.append(
                ChatMessage(role="tool", tool_call_id=block.get("tool_use_id"), content=inner or "")
            )
    if parts or calls:
        only_text = all(isinstance(p, TextPart) for p in parts)
        body: str | list[ContentPart] | None = (
            "".join(p.text for p in parts if isinstance(p, TextPart))
            if only_text and len(parts) <= 1
            else parts
        )
        out.append(ChatMessage(role=role, content=body or None, tool_calls=calls or None))
    return out


def _anthropic_tool_choice(choice: dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not choice:
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))


def from_anthropic(body: dict[str, Any]) -> ChatRequest:
    """Read an Anthropic Messages request into the canonical request."""
    check_chat_body(body, "anthropic")
    messages: list[ChatMessage] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    if system:
        messages.append(ChatMessage(role="system", content=system))
    for msg in body["messages"]:
        messages.extend(_anthropic_message(msg))
    tools = [
        Tool(
            function=FunctionDef(
                name=t["name"], description=t.get("description"), parameters=t.get("input_schema")
            )
        )
        for t in body.get("tools") or []
    ]
    metadata = body.get("metadata") or {}
    return ChatRequest(
        model=body["model"],
        messages=messages,
        max_tokens=body.get("max_tokens"),
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        stop=body.get("stop_sequences"),
        stream=body.get("stream"),
        tools=tools or None,
        tool_choice=_anthropic_tool_choice(body.get("tool_choice")),
        user=metadata.get("user_id"),
        # Anthropic-only settings ride along for an Anthropic target; others ignore them.
        **{k: body[k] for k in ("top_k", "thinking") if k in body},
    )
