"""Restore: put the personal data the safety plugin masked back into the answer.

With ``personal_data: {action: mask}`` the prompt reaches the provider with placeholders such as
``[EMAIL_ADDRESS_1]`` and the sealed facts carry the placeholder -> original table
(``facts["restore"]``). Models copy those placeholders verbatim; this hook replaces them with the
originals in what the client gets: message text and tool-call arguments (where the original is
written as a JSON string's content, so the arguments stay valid JSON), whole answers and streams.

In a stream a placeholder may arrive in pieces (``[EMAIL_`` then ``ADDRESS_1]``).
``PlaceholderWindow`` holds back only a tail that could still become a placeholder (at most the
longest placeholder less one character) and releases everything else at once.

It runs after output safety, which must see the masked answer (the originals are the user's own
data, not something the model produced).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.answer_hooks import AnswerHook, Chunks, Exchange

_ENVELOPE = ("id", "object", "created", "model")  # what a synthetic last chunk copies


class PlaceholderWindow:
    """Replaces placeholders in a text that arrives in pieces, holding back at most one."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self.table = dict(table)
        self._pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(self.table, key=len, reverse=True))
        )
        self.longest = max(map(len, self.table))
        self.buf = ""
        self.peak = 0

    def replace(self, text: str) -> str:
        return self._pattern.sub(lambda m: self.table[m.group(0)], text)

    def feed(self, text: str) -> str:
        self.buf += text
        self.peak = max(self.peak, len(self.buf))
        keep = self._partial_start()
        out, self.buf = self.replace(self.buf[:keep]), self.buf[keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.replace(self.buf), ""
        return out

    def _partial_start(self) -> int:
        """Where a tail that is the start of some placeholder (but not a whole one) begins."""
        n = len(self.buf)
        lo = max(0, n - self.longest + 1)
        start = self.buf.find("[", lo)
        while start >= 0:
            tail = self.buf[start:]
            if any(t.startswith(tail) and t != tail for t in self.table):
                return start
            start = self.buf.find("[", start + 1)
        return n


def _json_table(table: Mapping[str, str]) -> dict[str, str]:
    """The originals as they must appear inside a JSON string (tool-call arguments)."""
    return {t: orjson.dumps(o).decode()[1:-1] for t, o in table.items()}


class Restore(AnswerHook):
    async def on_answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        table = ex.facts.get("restore")
        if not table:
            return answer
        text = PlaceholderWindow(table)
        args = PlaceholderWindow(_json_table(table))
        for choice in answer.get("choices") or ():
            message = choice.get("message") or {}
            if isinstance(message.get("content"), str):
                message["content"] = text.replace(message["content"])
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                if isinstance(function.get("arguments"), str):
                    function["arguments"] = args.replace(function["arguments"])
        return answer

    def on_stream(self, ex: Exchange, chunks: Chunks) -> Chunks:
        table = ex.facts.get("restore")
        if not table:
            return chunks
        return _restore_stream(table, chunks)


async def _restore_stream(table: Mapping[str, str], chunks: Chunks) -> Chunks:
    json_table = _json_table(table)
    content: dict[int, PlaceholderWindow] = {}
    args: dict[tuple[int, int], PlaceholderWindow] = {}
    last: dict[str, Any] = {}
    async for chunk in chunks:
        last = chunk
        choices = []
        for choice in chunk.get("choices") or ():
            i = int(choice.get("index", 0))
            delta = dict(choice.get("delta") or {})
            done = choice.get("finish_reason") is not None
            text = delta.get("content")
            w = content.setdefault(i, PlaceholderWindow(table))
            released = w.feed(text) if isinstance(text, str) else ""
            if done or delta.get("tool_calls"):
                released += w.flush()
            if released:
                delta["content"] = released
            else:
                delta.pop("content", None)
            calls = []
            for call in delta.get("tool_calls") or ():
                k = int(call.get("index", 0))
                function = dict(call.get("function") or {})
                aw = args.setdefault((i, k), PlaceholderWindow(json_table))
                piece = function.get("arguments")
                if isinstance(piece, str):
                    function["arguments"] = aw.feed(piece)
                calls.append({**call, "function": function})
            if done:
                calls.extend(
                    {"index": k, "function": {"arguments": aw.flush()}}
                    for (ci, k), aw in args.items()
                    if ci == i and aw.buf
                )
            if calls:
                delta["tool_calls"] = calls
            choices.append({**choice, "delta": delta})
        yield {**chunk, "choices": choices} if chunk.get("choices") else chunk
    tail = [(i, w.flush()) for i, w in content.items() if w.buf]
    if tail:
        keep: dict[str, Any] = {k: last[k] for k in _ENVELOPE if k in last}
        yield {
            **keep,
            "choices": [
                {"index": i, "delta": {"content": t}, "finish_reason": None} for i, t in tail
            ],
        }
