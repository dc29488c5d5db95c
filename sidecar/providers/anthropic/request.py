"""The canonical (OpenAI-shaped) chat request as Anthropic Messages parameters.

Pure translation, no SDK and no I/O, so every rule below is testable on plain dicts. Where the two
APIs differ the choice is made here, once:

- system and developer messages, wherever they appear, become the top-level ``system``: Anthropic
  has no system role inside ``messages``;
- tool results are user turns made of ``tool_result`` blocks, and consecutive turns of one role are
  merged into one: Anthropic wants user and assistant to alternate, with a turn's tool results
  first;
- Anthropic has no JSON mode, so ``response_format`` becomes a system instruction (with the schema
  for ``json_schema``). The model is asked, not forced: a client that needs valid JSON must still
  check what comes back;
- ``max_tokens`` is required by Anthropic, so the adapter's default fills it in when the client
  set no budget; ``seed`` has no Anthropic equivalent and is dropped;
- ``temperature`` and ``top_p`` are dropped too: the anthropic SDK (2.x) no longer has them, and
  current Claude models answer 400 to them. OpenAI clients send them out of habit, and a 400
  would end the whole fallback chain (the dispatcher gives up on invalid requests);
- assistant ``reasoning_content`` in the history is dropped: Anthropic only accepts thinking blocks
  back with the signature it issued, which the canonical shape does not carry.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from deepgate.chat import ChatMessage, ChatRequest, ContentPart, ImagePart, TextPart
from deepgate.errors import InvalidRequest
from sidecar.providers.base import PROVIDER_UNSUPPORTED

_JSON_OBJECT_INSTRUCTION = (
    "Respond with one valid JSON object and nothing else: no prose, no Markdown code fences."
)


def to_messages_params(
    body: dict[str, Any], model: str, *, default_max_tokens: int
) -> dict[str, Any]:
    """Keyword arguments for ``AsyncAnthropic.messages.create`` (without ``stream``/timeout)."""
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as exc:
        # Field paths only: a validation message can quote the value, which may be prompt text.
        where = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors()[:3])
        raise InvalidRequest(
            f"The chat request is malformed (check {where}); send an OpenAI Chat Completions body."
        ) from None
    if req.n is not None and req.n > 1:
        raise InvalidRequest(
            "The anthropic provider returns one choice per request; set 'n' to 1 or leave it out.",
            param="n",
            code=PROVIDER_UNSUPPORTED,  # another target in the chain may serve it
        )
    system, messages = _messages(req.messages)
    instruction = _response_format_instruction(req.response_format)
    if instruction:
        system.append(instruction)

    params: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": req.output_budget() or default_max_tokens,
    }
    if system:
        params["system"] = "\n\n".join(system)
    if req.stop:
        params["stop_sequences"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.user:
        params["metadata"] = {"user_id": req.user}
    if req.tools:
        params["tools"] = [
            {
                "name": t.function.name,
                **({"description": t.function.description} if t.function.description else {}),
                # Anthropic requires a schema; OpenAI allows a function without parameters.
                "input_schema": t.function.parameters or {"type": "object", "properties": {}},
            }
            for t in req.tools
        ]
        choice = _tool_choice(req.tool_choice, (req.model_extra or {}).get("parallel_tool_calls"))
        if choice is not None:
            params["tool_choice"] = choice
    # Extended thinking has no OpenAI field; a client that knows Anthropic may send it as is.
    thinking = (req.model_extra or {}).get("thinking")
    if isinstance(thinking, dict):
        params["thinking"] = thinking
    return params


def _messages(history: list[ChatMessage]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(history):
        if msg.role in ("system", "developer"):
            if text := msg.text():
                system.append(text)
            continue
        if msg.role == "tool":
            role = "user"
            blocks = [
                {
                    "type": "tool_result",
                    "tool_use_id": msg.tool_call_id or "",
                    "content": msg.text(),
                }
            ]
        elif msg.role in ("user", "assistant"):
            role = msg.role
            blocks = _content_blocks(msg.content, i)
            if msg.role == "assistant":
                blocks += [
                    _tool_use(call.id, call.function.name, call.function.arguments, i)
                    for call in msg.tool_calls or []
                ]
        else:  # the legacy "function" role has no id to pair a result with its call
            raise InvalidRequest(
                f"messages[{i}] uses the legacy 'function' role, which the anthropic provider "
                "cannot map; send tool results with role 'tool' and a 'tool_call_id'.",
                param=f"messages[{i}].role",
            )
        if not blocks:
            continue  # Anthropic refuses empty turns; an empty one carries nothing anyway
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return system, out


def _content_blocks(content: str | list[ContentPart] | None, i: int) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, TextPart):
            if part.text:  # Anthropic rejects empty text blocks
                blocks.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            blocks.append({"type": "image", "source": _image_source(part.image_url.url, i)})
    return blocks


def _image_source(url: str, i: int) -> dict[str, Any]:
    if url.startswith("data:"):
        header, sep, data = url[len("data:") :].partition(",")
        media_type, _, encoding = header.partition(";")
        if sep and encoding == "base64" and media_type:
            return {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise InvalidRequest(
        f"messages[{i}] has an image the anthropic provider cannot read: use an http(s) URL "
        "or a data URL of the form data:<media type>;base64,<data>.",
        param=f"messages[{i}].content",
    )


def _tool_use(call_id: str, name: str, arguments: str, i: int) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequest(
            f"messages[{i}] has a tool call whose 'arguments' are not a JSON object; "
            "the anthropic provider needs them as one.",
            param=f"messages[{i}].tool_calls",
        )
    return {"type": "tool_use", "id": call_id, "name": name, "input": parsed}


def _tool_choice(choice: str | dict[str, Any] | None, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = {"type": "auto"} if parallel is False else None
    elif isinstance(choice, str):
        kinds = {"auto": "auto", "required": "any", "none": "none"}
        if choice not in kinds:
            raise InvalidRequest(
                "'tool_choice' must be 'auto', 'required', 'none' or a named function.",
                param="tool_choice",
            )
        out = {"type": kinds[choice]}
    else:
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(
                "A named 'tool_choice' needs {'type': 'function', 'function': {'name': ...}}.",
                param="tool_choice",
            )
        out = {"type": "tool", "name": name}
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _response_format_instruction(fmt: dict[str, Any] | None) -> str | None:
    kind = (fmt or {}).get("type")
    if kind == "json_object":
        return _JSON_OBJECT_INSTRUCTION
    if kind == "json_schema":
        spec = (fmt or {}).get("json_schema") or {}
        schema = spec.get("schema")
        if schema is None:
            return _JSON_OBJECT_INSTRUCTION
        return (
            f"{_JSON_OBJECT_INSTRUCTION} The object must conform to this JSON Schema:\n"
            f"{json.dumps(schema, separators=(',', ':'), sort_keys=True)}"
        )
    return None
