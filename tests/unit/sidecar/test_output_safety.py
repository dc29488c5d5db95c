"""Output safety on answers: the sliding window over streams, and whole answers.

The detectors are the real shared ones (detect-secrets, Presidio's pattern recognizers); the
stream is a list of canonical chunks, as a provider adapter yields them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deepgate.errors import ContentPolicyViolation, InternalError
from deepgate.request_facts import Facts
from deepgate.safety import Finding, build_detectors
from sidecar.answer_hooks import AnswerHooks, Exchange
from sidecar.hooks.output_safety import (
    Blocked,
    OutputDetectors,
    OutputSafety,
    ScanWindow,
)
from sidecar.metrics import Metrics

AWS = "AKIAZ7XQ4VLBN2PKW3RT"
BLOCK = {"secrets": {"action": "block"}}
REDACT = {"secrets": {"action": "redact"}}


@pytest.fixture(scope="module")
def secrets_redact() -> OutputDetectors:
    return OutputDetectors(build_detectors(REDACT))


def exchange(output: dict[str, Any] | None) -> Exchange:
    facts = Facts()
    if output is not None:
        facts["safety_output"] = output
    return Exchange("rq-1", "openai", facts, {"model": "m"}, stream=True)


def chunk(text: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    d = dict(delta)
    if text is not None:
        d["content"] = text
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
    }


async def feed(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


def pieces(text: str, *cuts: int) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


FILLER = "The deployment notes go on for a while before they get to the point. " * 6


def around_key(key_cuts: tuple[int, ...], tail: str = " and nothing else." * 30) -> list[str]:
    """Ten-character chunks of prose, the key split at ``key_cuts``, then ten-character chunks."""
    lead = FILLER + "Use this key: "
    return [
        *(lead[i : i + 10] for i in range(0, len(lead), 10)),
        *pieces(AWS, *key_cuts),
        *(tail[i : i + 10] for i in range(0, len(tail), 10)),
    ]


def stream_of(parts: list[str]) -> list[dict[str, Any]]:
    return [chunk(role="assistant", text=""), *(chunk(p) for p in parts), chunk(finish="stop")]


async def run_stream(hook: OutputSafety, ex: Exchange, items: list[dict[str, Any]]) -> str:
    hooks = AnswerHooks([hook])
    out = [c async for c in hooks.stream(ex, feed(items))]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in out if c.get("choices"))


# --- the window -------------------------------------------------------------------------------


@pytest.mark.parametrize("cuts", [(7,), (4, 13)], ids=["two-chunks", "three-chunks"])
async def test_a_secret_split_across_chunks_is_redacted(cuts: tuple[int, ...]) -> None:
    parts = around_key(cuts)
    text = "".join(parts)
    out = await run_stream(OutputSafety(), exchange(REDACT), stream_of(parts))
    assert out == text.replace(AWS, "[REDACTED:AWS_KEY]")
    assert AWS[:8] not in out  # no piece of the key reached the client either
    assert AWS[-8:] not in out


@pytest.mark.parametrize("cuts", [(7,), (4, 13)], ids=["two-chunks", "three-chunks"])
async def test_a_secret_split_across_chunks_blocks_the_stream(cuts: tuple[int, ...]) -> None:
    hook = OutputSafety()
    ex = exchange(BLOCK)
    got: list[dict[str, Any]] = []

    async def consume() -> None:
        async for c in AnswerHooks([hook]).stream(ex, feed(stream_of(around_key(cuts)))):
            got.append(c)

    with pytest.raises(ContentPolicyViolation) as info:
        await consume()
    assert "'secrets'" in info.value.message
    assert "aws_key" in info.value.message
    assert AWS not in info.value.message
    sent = "".join(c["choices"][0]["delta"].get("content") or "" for c in got)
    assert sent  # prose before the key was released as it came
    assert FILLER.startswith(sent) or sent.startswith(FILLER)
    assert AWS[:4] not in sent  # nothing from the key onwards was released
    assert not ex.complete  # the answer is not whole: the cache must not keep it
    assert "output:secrets" in ex.facts.get("findings", [])


async def test_the_buffer_stays_bounded_on_a_long_stream(secrets_redact: OutputDetectors) -> None:
    window = ScanWindow(secrets_redact.scan, secrets_redact.actions, secrets_redact.hold, step=48)
    piece = "lorem ipsum dolor sit amet, "  # 28 characters a chunk, 200,000 characters in all
    out = []
    for _ in range(200_000 // len(piece)):
        out.append(await window.feed(piece))
    out.append(await window.flush())
    assert "".join(out) == piece * (200_000 // len(piece))
    assert window.peak <= secrets_redact.hold + 48 + len(piece)


async def test_an_open_finding_is_held_from_its_start_but_never_past_the_limit() -> None:
    # A finding that reaches the end of what has arrived (a PEM key still coming) is held back.
    def scan_factory() -> Any:
        async def scan(text: str) -> list[Finding]:
            start = text.find("BEGIN")
            if start < 0:
                return []
            end = text.find("END", start)
            return [Finding("secrets", "private_key", start, len(text) if end < 0 else end + 3, 1)]

        return scan

    window = ScanWindow(scan_factory(), {"secrets": "redact"}, hold=16, step=8, max_buffer=400)
    released = await window.feed("intro words here, " * 3 + "BEGIN")
    assert "BEGIN" not in released
    body = ""
    for _ in range(10):
        body += await window.feed("x" * 20)
    assert "x" not in released + body  # the key's body is held: it belongs to the open finding
    assert window.peak < 400
    tail = await window.feed("xxEND and then the rest of the answer, long enough to release.")
    tail += await window.flush()
    assert released + body + tail == (
        "intro words here, " * 3 + "[REDACTED:PRIVATE_KEY] and then the rest of the answer, "
        "long enough to release."
    )
    # Past ``max_buffer`` the open finding is redacted as far as it goes, so the buffer stops.
    window = ScanWindow(scan_factory(), {"secrets": "redact"}, hold=16, step=8, max_buffer=400)
    await window.feed("BEGIN")
    for _ in range(100):
        await window.feed("y" * 20)
    assert window.peak <= 400 + 20


async def test_block_raises_before_release() -> None:
    async def scan(text: str) -> list[Finding]:
        i = text.find("bad")
        return [] if i < 0 else [Finding("rules", "bad", i, i + 3, 1.0)]

    window = ScanWindow(scan, {"rules": "block"}, hold=8, step=4)
    assert await window.feed("fine text that is long enough") != ""
    assert "ba" not in await window.feed("so ba")  # may be the start of a match: held
    with pytest.raises(Blocked):
        await window.feed("d things")


# --- the hook, streamed and whole -------------------------------------------------------------


async def test_log_counts_the_finding_and_changes_nothing() -> None:
    metrics = Metrics()
    hook = OutputSafety(metrics)
    text = "Use " + AWS + " to sign in. " * 10
    out = await run_stream(hook, exchange({"secrets": {"action": "log"}}), stream_of([text]))
    assert out == text
    value = metrics.registry.get_sample_value(
        "deepgate_output_safety_findings_total", {"detector": "secrets", "action": "log"}
    )
    assert value == 1.0


async def test_no_output_config_passes_the_stream_untouched() -> None:
    items = stream_of(["a ", AWS, " b"])
    out = [c async for c in OutputSafety().on_stream(exchange(None), feed(items))]
    assert out == items


def answer(content: str, arguments: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if arguments is not None:
        message["tool_calls"] = [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        ]
    return {"id": "a", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}


async def test_whole_answer_redacts_content_and_tool_arguments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.hooks.output_safety")
    metrics = Metrics()
    ex = exchange(REDACT)
    got = await OutputSafety(metrics).on_answer(
        ex, answer(f"key {AWS} here", '{"key": "' + AWS + '"}')
    )
    message = got["choices"][0]["message"]
    assert message["content"] == "key [REDACTED:AWS_KEY] here"
    assert message["tool_calls"][0]["function"]["arguments"] == '{"key": "[REDACTED:AWS_KEY]"}'
    value = metrics.registry.get_sample_value(
        "deepgate_output_safety_findings_total", {"detector": "secrets", "action": "redact"}
    )
    assert value == 2.0
    assert "secrets:aws_key (redact)" in caplog.text  # what fired, never what it was
    assert AWS not in caplog.text


async def test_whole_answer_block_names_the_detector_not_the_text() -> None:
    with pytest.raises(ContentPolicyViolation) as info:
        await OutputSafety().on_answer(exchange(BLOCK), answer("nothing", '{"k": "' + AWS + '"}'))
    assert info.value.status == 400
    assert info.value.code == "content_policy_violation"
    assert "secrets" in info.value.message
    assert AWS not in info.value.message


async def test_streamed_tool_call_arguments_are_redacted_across_pieces() -> None:
    args = '{"note": "store ' + AWS + ' safely", "pad": "' + "z" * 300 + '"}'
    parts = pieces(args, 20, 27, 35)
    items = [
        chunk(role="assistant"),
        chunk(
            tool_calls=[
                {"index": 0, "id": "t1", "type": "function", "function": {"name": "f"}},
            ]
        ),
        *(chunk(tool_calls=[{"index": 0, "function": {"arguments": p}}]) for p in parts),
        chunk(finish="tool_calls"),
    ]
    out = [c async for c in AnswerHooks([OutputSafety()]).stream(exchange(REDACT), feed(items))]
    sent = "".join(
        call.get("function", {}).get("arguments") or ""
        for c in out
        for call in c["choices"][0]["delta"].get("tool_calls") or ()
    )
    assert sent == args.replace(AWS, "[REDACTED:AWS_KEY]")
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_personal_data_redacted_in_a_stream() -> None:
    text = "Write to jane.doe@example.org for details. " + "More words follow here. " * 12
    out = await run_stream(
        OutputSafety(),
        exchange({"personal_data": {"action": "redact", "entities": ["EMAIL_ADDRESS"]}}),
        stream_of(pieces(text, 13, 21)),
    )
    assert "jane.doe" not in out
    assert out.startswith("Write to [REDACTED:EMAIL_ADDRESS] for details.")


async def test_detectors_are_built_once_per_config_and_a_bad_config_withholds_the_answer() -> None:
    hook = OutputSafety()
    first = await hook.detectors_for(exchange(REDACT))
    again = await hook.detectors_for(exchange({"secrets": {"action": "redact"}}))
    assert first is again
    with pytest.raises(InternalError) as info:
        await hook.on_answer(exchange({"secrets": {"action": "explode"}}), answer("hi"))
    assert "misconfigured" in info.value.message


async def test_a_finding_overlapping_an_open_one_is_held_whole() -> None:
    # "KEY-…" is complete, "…-TAIL…" reaches the end of what has arrived: neither may be cut.
    async def scan(text: str) -> list[Finding]:
        out = []
        k = text.find("KEY-1234")
        if k >= 0:
            out.append(Finding("secrets", "key", k, k + 8, 1.0))
        t = text.find("1234-TAIL")
        if t >= 0:
            end = text.find(".", t)
            out.append(Finding("secrets", "tail", t, len(text) if end < 0 else end, 1.0))
        return out

    window = ScanWindow(scan, {"secrets": "redact"}, hold=10, step=2)
    first = await window.feed("x" * 30 + "KEY-1234-TAIL" + "y" * 5)
    assert first == "x" * 30  # both held: the open one overlaps the complete one
    rest = await window.feed("z. and the answer goes on for a while.") + await window.flush()
    assert "KEY-" not in first + rest
    assert "TAIL" not in first + rest
    assert (first + rest).startswith("x" * 30 + "[REDACTED:KEY]. and")


# --- secrets only: the stream goes out word by word -------------------------------------------


async def test_with_secrets_only_a_short_answer_still_streams_word_by_word() -> None:
    words = ["One", " two", " three", " four", " five."]
    hooks = AnswerHooks([OutputSafety()])
    out = [c async for c in hooks.stream(exchange(REDACT), feed(stream_of(words)))]
    texts = [c["choices"][0]["delta"].get("content") for c in out if c.get("choices")]
    sent = [t for t in texts if t]
    assert "".join(sent) == "".join(words)
    assert len(sent) >= 4  # not held back to the end: each finished word goes out


async def test_word_by_word_still_catches_a_key_split_inside_and_a_pem_block() -> None:
    assert OutputDetectors(build_detectors(REDACT)).word_bounded
    pem = (
        "-----BEGIN RSA PRIVATE KEY-----\n"
        "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi4NHTl6HxtKw0VJJ8K0sZ7nYtL\n"
        "-----END RSA PRIVATE KEY-----"
    )
    text = f"Here it is: {AWS} and the key {pem} done."
    parts = [text[i : i + 5] for i in range(0, len(text), 5)]  # cuts inside every word
    sent = await run_stream(OutputSafety(), exchange(REDACT), stream_of(parts))
    assert AWS[4:12] not in sent
    assert "MIIEpAIBAAKCAQEA" not in sent
    assert sent.startswith("Here it is: ")
    assert sent.endswith(" done.")


def test_the_keyword_detector_keeps_the_full_hold() -> None:
    keyword = {"secrets": {"action": "redact", "kinds": ["aws_key", "secret_keyword"]}}
    assert not OutputDetectors(build_detectors(keyword)).word_bounded
    assert not OutputDetectors(
        build_detectors({"personal_data": {"action": "redact"}})
    ).word_bounded
