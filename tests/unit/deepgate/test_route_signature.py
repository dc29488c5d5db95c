"""Signed route decisions: what the runner signs, the sidecar accepts; nothing else."""

from __future__ import annotations

import pytest

from deepgate.errors import AuthenticationFailed
from deepgate.route_signature import sign_route, verify_route

KEY = b"k" * 32
NOW = 1_800_000_000.0


def test_round_trip() -> None:
    value = sign_route(KEY, "req-1", ["deepseek:deepseek-chat", "openai:gpt-4o-mini"], 60, NOW)
    assert verify_route(KEY, "req-1", value, NOW + 59) == [
        "deepseek:deepseek-chat",
        "openai:gpt-4o-mini",
    ]


@pytest.mark.parametrize(
    ("key", "rid", "mutate", "now", "why"),
    [
        (KEY, "req-1", lambda v: None, NOW, "no signed route"),
        (KEY, "req-1", lambda v: "deepseek:deepseek-chat", NOW, "malformed"),
        (KEY, "req-1", lambda v: v.replace("deepseek:", "openai:", 1), NOW, "does not match"),
        (KEY, "req-2", lambda v: v, NOW, "does not match"),
        (b"x" * 32, "req-1", lambda v: v, NOW, "does not match"),
        (KEY, "req-1", lambda v: v, NOW + 61, "expired"),
        (KEY, "req-1", lambda v: v.replace("exp=", "exp=9"), NOW, "does not match"),
    ],
)
def test_refusals(key: bytes, rid: str, mutate, now: float, why: str) -> None:  # type: ignore[no-untyped-def]
    value = sign_route(KEY, "req-1", ["deepseek:deepseek-chat"], 60, NOW)
    with pytest.raises(AuthenticationFailed) as err:
        verify_route(key, rid, mutate(value), now)
    assert why in err.value.message
    assert err.value.status == 401
    assert err.value.code == "invalid_route_signature"


@pytest.mark.parametrize("key", [b"k" * 32, b"x" * 100, b"", b"\xff" * 64])
def test_the_signature_is_rfc_2104_hmac_sha256(key: bytes) -> None:
    import hmac

    from deepgate.route_signature import _mac

    message = b"\n".join((b"deepgate-route-v1", b"req-1", b"openai:gpt-5-mini", b"1800000000"))
    expected = hmac.digest(key, message, "sha256").hex()
    assert _mac(key, "req-1", "openai:gpt-5-mini", 1800000000) == expected
