"""Output safety: the route's output detectors applied to the answer, whole or as it streams.

The ``deepgate-safety`` plugin puts the route's ``output`` block (a ``DetectorsConfig`` as JSON)
in the sealed facts (``facts["safety_output"]``); this hook builds those detectors (once per
distinct config) and applies each one's action to what the model wrote, message text and
tool-call arguments alike:

- ``block``: a whole answer becomes a 400 ``content_policy_violation`` naming the detector (never
  the text); a stream stops at once with an in-stream error event, which the OpenAI and Anthropic
  SDKs raise, and nothing after the finding reaches the client;
- ``redact`` (and ``mask``, which has nothing to restore on the way out): the span is replaced by
  ``[REDACTED:LABEL]`` in what the client gets;
- ``log``: counted (metrics, the usage record's safety outcome); no text is written anywhere.

Streams go through ``ScanWindow``: text is held back only as far as the longest match the
detectors must catch (``hold``), so a secret split across two or three chunks is still seen
whole, and everything before that is released. A finding that reaches the end of what has
arrived (a private key block still coming) is held from its start, up to ``max_buffer``
characters; the buffer never grows past that.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from deepgate.errors import ContentPolicyViolation, InternalError
from deepgate.safety import Action, Detector, Finding, build_detectors, redact
from sidecar.answer_hooks import AnswerHook, Chunks, Exchange
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)
_ENVELOPE = ("id", "object", "created", "model")  # what a synthetic last chunk copies

Scan = Callable[[str], Awaitable[list[Finding]]]
FindingSink = Callable[[Finding, Action], None]

# The longest match each detector must catch in one piece, in characters (a JWT or a GitLab
# token is well under 256; a card or an IBAN with spaces under 64). Longer findings (a PEM
# private key) are held from their start while they are still open, see ``ScanWindow``.
HOLD_CHARS: dict[str, int] = {"secrets": 256, "personal_data": 96, "injection": 256}
DEFAULT_HOLD = 256
# The named secret detectors never match across whitespace (keys, tokens, URLs; a PEM block is
# caught by its header and then held open): with only them, a stream need hold back no more
# than its unfinished last word, so the answer still streams word by word. The keyword detector
# (``secret_keyword``: ``password = ...``) matches across spaces, so it keeps the full hold.
WORD_BOUNDED = frozenset({"secrets"})
_LAST_WORD = re.compile(r"\S*\Z")
STEP_CHARS = 48  # release in steps of at least this much: one scan per step, not per token
MAX_BUFFER = 8192  # a 4096-bit RSA key in PEM is ~3,300 characters
_MAX_CONFIGS = 64


class Blocked(Exception):
    """A ``block`` finding in the answer; ``finding`` names the detector and label."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(f"{finding.detector}:{finding.label}")
        self.finding = finding


def refusal(finding: Finding) -> ContentPolicyViolation:
    return ContentPolicyViolation(
        f"The answer was withheld by the output safety check {finding.detector!r} "
        f"({finding.label}). Rephrase the request so the answer does not need that content, "
        "or ask the route's operator about the check."
    )


class ScanWindow:
    """A sliding window over one streamed text (a message's content, a tool call's arguments).

    ``feed`` takes the next piece and returns what may go to the client now, redacted; the rest
    is held. ``flush`` scans and returns what is left at the end of the stream. Raises
    ``Blocked`` on a finding whose action is ``block``. ``scan`` is any detector set's scan;
    ``actions`` maps detector names to actions (unknown ones count as ``block``).

    Why it is safe to release ``buf[:len(buf) - hold]``: a match at most ``hold`` characters
    long that covers a released character must start before the cut, so it ends inside the
    buffer and has been seen. The last ``hold`` released characters stay as left context, so a
    rule that needs what comes before a match (a word boundary, a keyword) still sees it.
    """

    def __init__(
        self,
        scan: Scan,
        actions: Mapping[str, Action],
        hold: int,
        step: int = STEP_CHARS,
        max_buffer: int = MAX_BUFFER,
        sink: FindingSink | None = None,
        word_bounded: bool = False,
    ) -> None:
        self.scan = scan
        self.word_bounded = word_bounded
        self.actions = actions
        self.hold = hold
        self.step = step
        self.max_buffer = max(max_buffer, hold + step)
        self.sink = sink
        self.buf = ""
        self.context = ""  # the last ``hold`` characters released (as written, before redaction)
        self.peak = 0  # the most characters ever held at once (for tests and the benchmark)

    async def feed(self, text: str) -> str:
        self.buf += text
        self.peak = max(self.peak, len(self.buf))
        if self.word_bounded:  # release each finished word (see WORD_BOUNDED)
            if len(self.buf) <= self._held():
                return ""
        elif len(self.buf) < self.hold + self.step:
            return ""
        return await self._release(final=False)

    def _held(self) -> int:
        """How much of the buffer's end must wait for what comes next."""
        if not self.word_bounded:
            return self.hold
        tail = _LAST_WORD.search(self.buf)
        return min(self.hold, len(tail.group()) if tail else 0)

    async def flush(self) -> str:
        if not self.buf:
            return ""
        return await self._release(final=True)

    async def _release(self, final: bool) -> str:
        offset = len(self.context)
        seen = self.context + self.buf
        findings = [f for f in await self.scan(seen) if f.end > offset]
        for f in findings:
            if self.actions.get(f.detector, "block") == "block":
                raise Blocked(f)
        # In buffer coordinates, clipped to it: a finding that began in released text can only
        # be redacted from here on.
        spans = [
            Finding(f.detector, f.label, max(f.start - offset, 0), f.end - offset, f.score)
            for f in findings
        ]
        cut = len(self.buf) if final else self._cut(spans)
        if cut <= 0:
            return ""
        released = [f for f in spans if f.start < cut]
        for f in released:
            if self.sink is not None:
                self.sink(f, self.actions.get(f.detector, "block"))
        to_redact = [f for f in released if self.actions.get(f.detector) in ("redact", "mask")]
        out = redact(self.buf[:cut], [_clip(f, cut) for f in to_redact])
        self.context = (self.context + self.buf[:cut])[-self.hold :]
        self.buf = self.buf[cut:]
        return out

    def _cut(self, spans: list[Finding]) -> int:
        """How much of the buffer may go out now (see the class docstring)."""
        cut = len(self.buf) - self._held()

        def still_open(f: Finding) -> bool:  # it may go on in the next piece
            return f.end >= len(self.buf) and len(self.buf) < self.max_buffer

        for f in sorted(spans, key=lambda s: s.start):  # complete findings go out whole
            if f.start >= cut:
                break
            if not still_open(f):
                cut = max(cut, f.end)
        held = [f.start for f in spans if still_open(f) and f.start < cut]
        if held:  # an open finding holds everything from its start, and whatever overlaps it
            cut = min(held)
            while crossing := [f.start for f in spans if f.start < cut < f.end]:
                cut = min(crossing)
        return cut


def _word_bounded(detector: Detector) -> bool:
    if detector.name not in WORD_BOUNDED:
        return False
    labels = [label for label, _ in getattr(detector, "plugins", ())]
    return "secret_keyword" not in labels


def _clip(f: Finding, end: int) -> Finding:
    return f if f.end <= end else Finding(f.detector, f.label, f.start, end, f.score)


class OutputDetectors:
    """One route's output detectors, built from its config, and how to run them."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        self.detectors = tuple(detectors)
        self.actions: dict[str, Action] = {d.name: d.action for d in self.detectors}
        self.hold = max((HOLD_CHARS.get(d.name, DEFAULT_HOLD) for d in self.detectors), default=0)
        self.word_bounded = all(_word_bounded(d) for d in self.detectors)

    def scan_sync(self, text: str) -> list[Finding]:
        return [f for d in self.detectors for f in d.scan(text)]

    async def scan(self, text: str) -> list[Finding]:
        """Fast detectors on the loop; slow ones (spaCy) in a worker thread."""
        out: list[Finding] = []
        for d in self.detectors:
            out.extend(await asyncio.to_thread(d.scan, text) if d.slow else d.scan(text))
        return out


class OutputSafety(AnswerHook):
    def __init__(self, metrics: Metrics | None = None, step: int = STEP_CHARS) -> None:
        self.metrics = metrics
        self.step = step
        self._built: dict[bytes, OutputDetectors] = {}
        self._lock = asyncio.Lock()

    async def detectors_for(self, ex: Exchange) -> OutputDetectors | None:
        config = ex.facts.get("safety_output")
        if not config:
            return None
        key = orjson.dumps(config, option=orjson.OPT_SORT_KEYS)
        built = self._built.get(key)
        if built is not None:
            return built
        async with self._lock:  # one build per config, off the loop (Presidio loads slowly)
            built = self._built.get(key)
            if built is None:
                try:
                    detectors = await asyncio.to_thread(build_detectors, config)
                except ValueError as exc:  # pydantic's ValidationError is a ValueError
                    log.error("the route's output safety config is invalid: %s", exc)
                    raise InternalError(
                        "The route's output safety checks are misconfigured, so the answer was "
                        "withheld. The operator should validate the deepgate-safety 'output' "
                        "block (deepgate check-config)."
                    ) from None
                built = OutputDetectors(detectors)
                if len(self._built) >= _MAX_CONFIGS:
                    self._built.pop(next(iter(self._built)))
                self._built[key] = built
        return built

    def _sink(self, ex: Exchange) -> FindingSink:
        def record(finding: Finding, action: Action) -> None:
            if self.metrics is not None:
                self.metrics.output_finding(finding.detector, action)
            # Names only (the request id comes from the log context): never the text.
            log.info("output safety finding %s:%s (%s)", finding.detector, finding.label, action)
            mark = f"output:{finding.detector}"
            fired = ex.facts.get("findings", [])
            if mark not in fired:
                ex.facts["findings"] = [*fired, mark]

        return record

    # --- whole answers ----------------------------------------------------------------------

    async def on_answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        dets = await self.detectors_for(ex)
        if dets is None:
            return answer
        sink = self._sink(ex)
        slots = list(_answer_slots(answer))
        if not slots:
            return answer
        scanned = await asyncio.to_thread(lambda: [dets.scan_sync(text) for _, _, text in slots])
        for findings in scanned:
            for f in findings:
                if dets.actions.get(f.detector, "block") == "block":
                    sink(f, "block")
                    raise refusal(f)
        for (holder, key, text), findings in zip(slots, scanned, strict=True):
            for f in findings:
                sink(f, dets.actions[f.detector])
            spans = [f for f in findings if dets.actions[f.detector] in ("redact", "mask")]
            if spans:
                holder[key] = redact(text, spans)
        return answer

    # --- streams ----------------------------------------------------------------------------

    def on_stream(self, ex: Exchange, chunks: Chunks) -> Chunks:
        return self._stream(ex, chunks)

    async def _stream(self, ex: Exchange, chunks: Chunks) -> Chunks:
        dets = await self.detectors_for(ex)
        if dets is None:
            async for chunk in chunks:
                yield chunk
            return
        sink = self._sink(ex)

        def window() -> ScanWindow:
            return ScanWindow(
                dets.scan,
                dets.actions,
                dets.hold,
                self.step,
                sink=sink,
                word_bounded=dets.word_bounded,
            )

        streams = _StreamWindows(window)
        last: dict[str, Any] = {}
        try:
            async for chunk in chunks:
                last = chunk
                out = await streams.chunk(chunk)
                if out is not None:
                    yield out
            tail = await streams.flush_all(last)
            if tail is not None:
                yield tail
        except Blocked as exc:
            sink(exc.finding, "block")
            raise refusal(exc.finding) from None


class _StreamWindows:
    """The windows of one stream: per choice, its content and each tool call's arguments."""

    def __init__(self, make: Callable[[], ScanWindow]) -> None:
        self.make = make
        self.content: dict[int, ScanWindow] = {}
        self.args: dict[tuple[int, int], ScanWindow] = {}

    async def chunk(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        choices = chunk.get("choices") or []
        changed = []
        for choice in choices:
            i = int(choice.get("index", 0))
            delta = dict(choice.get("delta") or {})
            text = delta.pop("content", None)
            calls = delta.pop("tool_calls", None)
            out_text = ""
            if isinstance(text, str) and text:
                out_text += await self.content.setdefault(i, self.make()).feed(text)
            out_calls: list[dict[str, Any]] = []
            if calls:
                # The text is over once tool calls start: release it first, in order.
                out_text += await self._flush_content(i)
                for call in calls:
                    out_calls.extend(await self._call(i, call))
            if choice.get("finish_reason"):
                out_text += await self._flush_content(i)
                out_calls.extend(await self._flush_args(i))
            if out_text:
                delta["content"] = out_text
            if out_calls:
                delta["tool_calls"] = out_calls
            changed.append({**choice, "delta": delta})
        if choices and not any(_carries(c) for c in changed) and not chunk.get("usage"):
            return None  # everything in it is held back for now
        return {**chunk, "choices": changed} if choices else chunk

    async def _call(self, i: int, call: dict[str, Any]) -> list[dict[str, Any]]:
        k = int(call.get("index", 0))
        out: list[dict[str, Any]] = []
        for (ci, ck), w in list(self.args.items()):  # an earlier call is finished
            if ci == i and ck != k and w.buf:
                out.append({"index": ck, "function": {"arguments": await w.flush()}})
        function = dict(call.get("function") or {})
        pieces = function.pop("arguments", None)
        released = ""
        if isinstance(pieces, str) and pieces:
            released = await self.args.setdefault((i, k), self.make()).feed(pieces)
        if released:
            function["arguments"] = released
        if function or len(call) > 2 or released:
            out.append({**call, "function": function})
        return out

    async def _flush_content(self, i: int) -> str:
        w = self.content.get(i)
        return await w.flush() if w is not None else ""

    async def _flush_args(self, i: int) -> list[dict[str, Any]]:
        out = []
        for (ci, ck), w in self.args.items():
            if ci == i and w.buf:
                out.append({"index": ck, "function": {"arguments": await w.flush()}})
        return out

    async def flush_all(self, last: dict[str, Any]) -> dict[str, Any] | None:
        """What is still held when a stream ends without a finish reason for every choice."""
        choices = []
        for i in sorted({*self.content, *(ci for ci, _ in self.args)}):
            delta: dict[str, Any] = {}
            text = await self._flush_content(i)
            calls = await self._flush_args(i)
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            if delta:
                choices.append({"index": i, "delta": delta, "finish_reason": None})
        if not choices:
            return None
        keep: dict[str, Any] = {k: last[k] for k in _ENVELOPE if k in last}
        return {**keep, "choices": choices}


def _carries(choice: dict[str, Any]) -> bool:
    return bool(choice.get("delta")) or choice.get("finish_reason") is not None


def _answer_slots(answer: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """(holder, key, text) of every text the model wrote: message content, tool-call arguments."""
    out: list[tuple[dict[str, Any], str, str]] = []
    for choice in answer.get("choices") or ():
        message = choice.get("message") or {}
        if isinstance(message.get("content"), str) and message["content"]:
            out.append((message, "content", message["content"]))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            if isinstance(function.get("arguments"), str) and function["arguments"]:
                out.append((function, "arguments", function["arguments"]))
    return out
