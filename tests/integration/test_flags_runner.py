"""Plugin flags through the runner protocol: ``plugin.<name>.enabled`` skips a plugin."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepgate.flags import FLAGS
from plugins.runner import codec
from tests.integration.conftest import call, chat_body, prepare, run_call

FLAG_FILE = """\
flags:
  plugin.test-stop.enabled:
    value: true
    rules:
      - when: {consumer: [bob]}
        value: false
      - when: {route: [quiet-route]}
        value: false
      - when: {model: [local]}
        value: false
"""


@pytest.fixture
def flag_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "flags.yaml"
    path.write_text(FLAG_FILE, encoding="utf-8")
    FLAGS.configure(path, check_interval_s=0)
    yield path
    FLAGS.reset()


@pytest.fixture
def no_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("DEEPGATE_FLAGS_FILE", raising=False)
    FLAGS.reset()
    yield
    FLAGS.reset()


async def stop_chain(sock: str) -> int:
    return await prepare(sock, [("test-stop", {"text": "stopped"})])


@pytest.mark.usefixtures("flag_file")
async def test_a_plugin_is_skipped_for_the_consumer_its_flag_names(inproc_runner: str) -> None:
    token = await stop_chain(inproc_runner)
    resp, apisix = await run_call(
        inproc_runner, token, chat_body(), consumer_name="alice", route_id="chat-completions"
    )
    assert isinstance(resp.action, codec.Stop)
    assert resp.action.body == b"stopped"
    assert "var:consumer_name" in apisix.asked

    resp, _ = await run_call(
        inproc_runner, token, chat_body(), consumer_name="bob", route_id="chat-completions"
    )
    assert resp.action is None  # skipped: nothing else in the chain changed the request


@pytest.mark.usefixtures("flag_file")
async def test_a_plugin_is_skipped_by_route_and_by_model(inproc_runner: str) -> None:
    token = await stop_chain(inproc_runner)
    resp, _ = await run_call(
        inproc_runner, token, chat_body(), consumer_name="alice", route_id="quiet-route"
    )
    assert resp.action is None
    local = chat_body()
    resp, _ = await run_call(
        inproc_runner, token, local.replace(b"deepseek-chat", b"local"), consumer_name="alice"
    )
    assert resp.action is None


async def test_a_flag_file_change_applies_to_the_next_request(
    inproc_runner: str, flag_file: Path
) -> None:
    token = await stop_chain(inproc_runner)
    resp, _ = await run_call(inproc_runner, token, chat_body(), consumer_name="bob")
    assert resp.action is None
    await asyncio.to_thread(
        flag_file.write_text, "flags:\n  plugin.test-stop.enabled:\n    value: true\n"
    )
    resp, _ = await run_call(inproc_runner, token, chat_body(), consumer_name="bob")
    assert isinstance(resp.action, codec.Stop)


@pytest.mark.usefixtures("no_flags")
async def test_without_a_flag_file_the_runner_asks_nothing_extra(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-stop", {}), ("deepgate-prompt-filter", {})])
    resp, apisix = await run_call(inproc_runner, token, chat_body(), call(), consumer_name="bob")
    assert isinstance(resp.action, codec.Stop)
    assert apisix.asked == []  # no consumer, route or body fetched for flags


async def test_a_flag_file_without_the_plugin_asks_nothing_extra(
    inproc_runner: str, tmp_path: Path
) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("flags:\n  plugin.some-other.enabled:\n    value: false\n")
    FLAGS.configure(path, check_interval_s=0)
    try:
        token = await stop_chain(inproc_runner)
        resp, apisix = await run_call(inproc_runner, token, chat_body(), consumer_name="bob")
    finally:
        FLAGS.reset()
    assert isinstance(resp.action, codec.Stop)
    assert apisix.asked == []
