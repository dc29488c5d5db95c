"""deepgate-auth-bridge: each SDK's credential lands in key-auth's header, and only there."""

from __future__ import annotations

import pytest

from plugins.runner import codec
from tests.integration.conftest import call, prepare, run_call

AB = "deepgate-auth-bridge"


async def bridge(
    sock: str, headers: list[tuple[str, str | None]], conf: object = None
) -> codec.Rewrite | None:
    token = await prepare(sock, [(AB, conf or {})])
    resp, apisix = await run_call(sock, token, None, call(headers=headers))
    assert apisix.asked == []  # it never needs the body
    assert resp.action is None or isinstance(resp.action, codec.Rewrite)
    return resp.action


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            [("authorization", "Bearer sk-openai-style")],
            [("apikey", "sk-openai-style"), ("authorization", None)],
        ),
        (
            [("authorization", "bearer   sk-lower ")],
            [("apikey", "sk-lower"), ("authorization", None)],
        ),
        (
            [("x-api-key", "sk-anthropic-style")],
            [("apikey", "sk-anthropic-style"), ("x-api-key", None)],
        ),
        (
            [("authorization", "Bearer sk-a"), ("x-api-key", "sk-b")],
            [("apikey", "sk-a"), ("authorization", None), ("x-api-key", None)],
        ),
        ([("authorization", "Basic dXNlcjpwYXNz")], [("authorization", None)]),
        (
            [("apikey", "sk-direct"), ("authorization", "Bearer sk-other")],
            [("authorization", None)],
        ),
    ],
)
async def test_credentials_move_to_the_key_auth_header(
    inproc_runner: str,
    headers: list[tuple[str, str | None]],
    expected: list[tuple[str, str | None]],
) -> None:
    action = await bridge(inproc_runner, headers)
    assert action is not None
    assert action.headers == expected
    assert action.body == b""


async def test_no_credential_no_action(inproc_runner: str) -> None:
    assert await bridge(inproc_runner, [("content-type", "application/json")]) is None


async def test_the_target_header_is_configurable(inproc_runner: str) -> None:
    action = await bridge(inproc_runner, [("x-api-key", "k")], {"header": "x-deepgate-key"})
    assert action is not None
    assert action.headers == [("x-deepgate-key", "k"), ("x-api-key", None)]
