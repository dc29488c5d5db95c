"""The runner's settings read from its environment."""

from __future__ import annotations

import pytest


def test_poll_window_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    from plugins.runner.server import DEFAULT_POLL_US, poll_seconds

    assert poll_seconds(None) == poll_seconds("") == DEFAULT_POLL_US / 1_000_000
    assert poll_seconds("0") == 0
    assert poll_seconds("150") == 0.00015
    assert poll_seconds("-5") == 0
    assert poll_seconds("soon") == DEFAULT_POLL_US / 1_000_000
    assert "DEEPGATE_RUNNER_POLL_US='soon' is not a whole number" in caplog.text
