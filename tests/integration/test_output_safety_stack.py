"""Output safety and restore with the shipped config, the whole chain as `make run` starts it.

The real plugin runner masks the prompt and seals the facts, the sidecar opens them and runs its
answer hooks: what the fake provider answers (placeholders, a secret split across chunks) is
what the client's SDK gets after restore and output safety. Uses the end-to-end stack fixture.
"""

from __future__ import annotations

import openai

from tests.e2e.conftest import KEY, Stack, _reset_fakes, stack  # noqa: F401 (fixtures)
from tests.integration.test_output_safety import AWS, LEAD, TAIL, completion, sse, words

MAIL = "maria.keller@example.net"


def client(s: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.base}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_masked_email_comes_back_in_the_answer(stack: Stack) -> None:  # noqa: F811
    stack.fakes.deepseek.behave(reply=completion("I will write to [EMAIL_ADDRESS_1] today."))
    with client(stack) as oa:
        answer = oa.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": f"Draft a note to {MAIL} about Friday."}],
        )
    sent = str(stack.fakes.deepseek.received[-1].body)
    assert MAIL not in sent  # the provider saw the placeholder only
    assert "[EMAIL_ADDRESS_1]" in sent
    assert answer.choices[0].message.content == f"I will write to {MAIL} today."


def test_masked_email_comes_back_in_a_stream_split_anywhere(stack: Stack) -> None:  # noqa: F811
    stack.fakes.deepseek.behave(reply=sse(["Sending to [EMAIL", "_ADDR", "ESS_1] now."]))
    with client(stack) as oa:
        stream = oa.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": f"Tell {MAIL} the meeting moved."}],
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == f"Sending to {MAIL} now."


def test_shipped_output_config_redacts_a_secret_split_across_chunks(stack: Stack) -> None:  # noqa: F811
    parts = [*words(LEAD), AWS[:6], AWS[6:14], AWS[14:], *words(TAIL)]
    stack.fakes.deepseek.behave(reply=sse(parts))
    with client(stack) as oa:
        stream = oa.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "Write the deployment notes for service 41."}],
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == LEAD + "[REDACTED:AWS_KEY]" + TAIL
