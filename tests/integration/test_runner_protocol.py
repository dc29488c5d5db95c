"""The runner over a real Unix socket, driven from APISIX's side of the protocol."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from pathlib import Path

import orjson
import pytest

from devgateway.driver import ExtPluginDriver, PluginChain, RunnerConnection, RunnerError
from plugins.runner import codec, tables
from plugins.runner.codec import ErrCode, MsgType
from tests.integration.conftest import (
    TEST_REGISTRY,
    Apisix,
    RunnerProcess,
    call,
    chat_body,
    prepare,
    run_call,
    start_runner,
    stop_json,
)

PF = "deepgate-prompt-filter"


# --- process and socket -----------------------------------------------------------------------


def test_socket_is_world_connectable_and_replaces_a_stale_file(sock_dir: Path) -> None:
    stale = sock_dir / "runner.sock"
    stale.write_bytes(b"left over from a crash")
    rp = start_runner(sock_dir)
    try:
        deadline = time.monotonic() + 10
        while not stat.S_ISSOCK(os.stat(rp.path).st_mode):
            assert time.monotonic() < deadline, "stale file was not replaced"
            time.sleep(0.02)
        assert stat.S_IMODE(os.stat(rp.path).st_mode) == 0o766
    finally:
        assert rp.stop() == 0


def test_missing_listen_address_is_a_clear_startup_error(sock_dir: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "APISIX_LISTEN_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-m", "plugins.runner"], env=env, capture_output=True, timeout=30
    )
    assert out.returncode == 2
    assert b"APISIX_LISTEN_ADDRESS" in out.stderr


async def test_sigterm_finishes_the_call_in_flight_and_exits_0(
    runner_process: RunnerProcess,
) -> None:
    token = await prepare(runner_process.path, [(PF, {"max_prompt_tokens": 100})])
    apisix_answered = asyncio.Event()

    async def slow_apisix(info: codec.ExtraInfo) -> bytes | None:
        # The call is in flight (the runner is waiting for the body) when SIGTERM arrives.
        runner_process.proc.terminate()
        await asyncio.sleep(0.3)
        apisix_answered.set()
        return chat_body("Hello   there")

    conn = await RunnerConnection.open(runner_process.path)
    resp = await conn.req_call(call(token=token), slow_apisix)
    await conn.close()
    assert apisix_answered.is_set()
    assert isinstance(resp.action, codec.Rewrite)
    loop = asyncio.get_running_loop()
    started = loop.time()
    rc = await loop.run_in_executor(None, runner_process.proc.wait, 5)
    assert rc == 0
    assert loop.time() - started < 1.5
    # and it no longer accepts connections
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        await RunnerConnection.open(runner_process.path)


# --- PrepareConf ------------------------------------------------------------------------------


async def test_prepare_same_conf_same_token_other_conf_other_token(inproc_runner: str) -> None:
    a = await prepare(inproc_runner, [(PF, {"max_prompt_tokens": 10})])
    b = await prepare(inproc_runner, [(PF, {"max_prompt_tokens": 10})])
    c = await prepare(inproc_runner, [(PF, {"max_prompt_tokens": 11})])
    assert a == b != c
    assert a != 0


@pytest.mark.parametrize(
    ("conf", "logged"),
    [
        ([("no-such-plugin", "{}")], "unknown plugin 'no-such-plugin'"),
        ([(PF, '{"max_prompt_tokens": "many"}')], "max_prompt_tokens"),
        ([(PF, '{"no_such_key": 1}')], "no_such_key"),
        ([(PF, '{"deny_patterns": ["(unclosed"]}')], "deny_patterns[0]"),
        ([(PF, "{not json")], "not valid JSON"),
    ],
)
def test_bad_conf_is_bad_request_with_a_log_line_naming_plugin_and_problem(
    runner_process: RunnerProcess, conf: list[tuple[str, str]], logged: str
) -> None:
    async def go() -> None:
        with pytest.raises(RunnerError) as err:
            await prepare(runner_process.path, conf)
        assert err.value.code == ErrCode.BAD_REQUEST

    asyncio.run(go())
    logs = runner_process.logs()
    assert logged in logs
    assert conf[0][0] in logs
    assert runner_process.stop() == 0


# --- HTTPReqCall ------------------------------------------------------------------------------


async def test_unknown_token_is_conf_token_not_found(inproc_runner: str) -> None:
    with pytest.raises(RunnerError) as err:
        await run_call(inproc_runner, 987654, chat_body())
    assert err.value.code == ErrCode.CONF_TOKEN_NOT_FOUND


async def test_id_zero_and_large_ids_are_echoed(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-slow", {})])
    for rid in (0, 1, 0xFFFFFFFF):
        resp, _ = await run_call(inproc_runner, token, None, call(id=rid))
        assert resp.id == rid


async def test_no_plugins_wanting_work_means_no_action_and_no_questions(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [])
    resp, apisix = await run_call(inproc_runner, token, chat_body())
    assert resp.action is None
    assert apisix.asked == []


async def test_body_and_vars_asked_once_per_call_and_only_when_needed(inproc_runner: str) -> None:
    chain = [
        ("test-vars", {"names": ["consumer_name", "route_id"]}),
        ("test-read-body", {}),
        (PF, {}),
        ("test-read-body", {}),
    ]
    token = await prepare(inproc_runner, chain)
    resp, apisix = await run_call(
        inproc_runner, token, chat_body("Hi"), consumer_name="alice", route_id="r1"
    )
    assert apisix.asked == ["var:consumer_name", "var:route_id", "body"]
    assert isinstance(resp.action, codec.Rewrite)
    headers = dict(resp.action.headers)
    assert headers == {
        "x-var-consumer_name": "alice",
        "x-var-route_id": "r1",
        "x-model": "deepseek-chat",
    }
    assert resp.action.resp_headers == [("x-seen", "yes")]
    assert resp.action.body == b""  # nothing changed the body

    # a chain that never reads the body never asks for it
    token = await prepare(inproc_runner, [("test-vars", {"names": []})])
    _, apisix = await run_call(inproc_runner, token, chat_body())
    assert apisix.asked == []


async def test_what_the_chain_always_reads_is_asked_in_one_round_trip(inproc_runner: str) -> None:
    token = await prepare(
        inproc_runner, [("test-prefetch", {"names": ["consumer_name"]}), ("test-read-body", {})]
    )
    reader, writer = await asyncio.open_unix_connection(inproc_runner)

    async def read_frame() -> tuple[int, bytes]:
        msg_type, size = codec.parse_header(await reader.readexactly(4))
        return msg_type, await reader.readexactly(size)

    try:
        req = codec.encode_http_req_call_req(call(token=token, id=7))
        writer.write(codec.frame(MsgType.RPC_HTTP_REQ_CALL, req))
        # All three questions arrive before APISIX has answered any of them ...
        frames = [await asyncio.wait_for(read_frame(), 5) for _ in range(3)]
        questions = [codec.decode_extra_info_req(payload).info for _, payload in frames]
        assert questions == [codec.Var("consumer_name"), codec.Var("remote_addr"), codec.ReqBody()]
        # ... and APISIX's in-order answers are matched to them.
        for answer in (b"alice", b"10.0.0.1", chat_body("Hi")):
            writer.write(codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(answer)))
        msg_type, payload = await asyncio.wait_for(read_frame(), 5)
    finally:
        writer.close()
    assert msg_type == MsgType.RPC_HTTP_REQ_CALL
    action = codec.decode_http_req_call_resp(payload).action
    assert isinstance(action, codec.Rewrite)
    assert dict(action.headers) == {"x-var-consumer_name": "alice", "x-model": "deepseek-chat"}


async def test_missing_variable_reads_as_absent(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-vars", {"names": ["consumer_name"]})])
    resp, _ = await run_call(inproc_runner, token, None)
    assert isinstance(resp.action, codec.Rewrite)
    assert resp.action.headers == [("x-var-consumer_name", None)]  # a delete, per the protocol


async def test_stop_ends_the_chain(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-stop", {"status": 203}), ("test-boom", {})])
    resp, _ = await run_call(inproc_runner, token, None)
    assert resp.action == codec.Stop(status=203, headers=[("x-by", "stop")], body=b"cached")


async def test_plugin_exception_fails_closed_with_openai_error(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-boom", {})])
    resp, _ = await run_call(inproc_runner, token, None, call(headers=[("x-request-id", "rq-7")]))
    status, body, headers = stop_json(resp)
    assert status == 500
    assert headers["content-type"] == "application/json"
    assert body["error"]["type"] == "api_error"
    assert body["error"]["code"] == "plugin_error"
    assert "rq-7" in body["error"]["message"]
    assert "plugin bug" not in body["error"]["message"]


async def test_plugin_exception_with_on_error_open_goes_on(inproc_runner: str) -> None:
    token = await prepare(
        inproc_runner, [("test-boom", {"on_error": "open"}), ("test-slow", {"delay_ms": 0})]
    )
    resp, _ = await run_call(inproc_runner, token, None)
    assert isinstance(resp.action, codec.Rewrite)
    assert resp.action.headers == [("x-slept-ms", "0")]


async def test_anthropic_route_gets_anthropic_error_shape(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-boom", {})])
    resp, _ = await run_call(inproc_runner, token, None, call(path="/v1/messages"))
    status, body, _ = stop_json(resp)
    assert status == 500
    assert body["type"] == "error"
    assert body["error"]["type"] == "api_error"


# --- HTTPRespCall -----------------------------------------------------------------------------


async def test_resp_call_without_hooks_leaves_the_response_alone(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [(PF, {})])
    apisix = Apisix(b'{"ok": true}')
    conn = await RunnerConnection.open(inproc_runner)
    resp = await conn.resp_call(codec.HTTPRespCallReq(id=5, conf_token=token, status=200), apisix)
    await conn.close()
    assert resp == codec.HTTPRespCallResp(id=5)
    assert apisix.asked == []


async def test_resp_call_hook_reads_and_replaces_the_body(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-upper", {})])
    apisix = Apisix(b"streamed answer")
    conn = await RunnerConnection.open(inproc_runner)
    resp = await conn.resp_call(
        codec.HTTPRespCallReq(id=6, conf_token=token, status=200, headers=[("a", "b")]), apisix
    )
    await conn.close()
    assert apisix.asked == ["resp_body"]
    assert resp == codec.HTTPRespCallResp(id=6, headers=[("x-upper", "1")], body=b"STREAMED ANSWER")


async def test_resp_call_hook_failure_answers_500(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [("test-boom", {})])
    conn = await RunnerConnection.open(inproc_runner)
    resp = await conn.resp_call(codec.HTTPRespCallReq(id=7, conf_token=token, status=200))
    await conn.close()
    assert resp.status == 500
    assert orjson.loads(resp.body)["error"]["code"] == "plugin_error"


async def test_resp_call_with_unknown_token(inproc_runner: str) -> None:
    conn = await RunnerConnection.open(inproc_runner)
    with pytest.raises(RunnerError) as err:
        await conn.resp_call(codec.HTTPRespCallReq(id=7, conf_token=424242, status=200))
    await conn.close()
    assert err.value.code == ErrCode.CONF_TOKEN_NOT_FOUND


# --- expiry and token misses ------------------------------------------------------------------


async def test_conf_expires_after_expire_time_plus_margin(sock_dir: Path) -> None:
    rp = start_runner(sock_dir, expire="1")  # kept 1 s + a 1 s margin after last use
    try:
        token = await prepare(rp.path, [(PF, {})])
        for _ in range(3):  # use keeps it alive
            await asyncio.sleep(0.8)
            resp, _ = await run_call(rp.path, token, chat_body())
            assert resp.action is None
        await asyncio.sleep(2.3)
        with pytest.raises(RunnerError) as err:
            await run_call(rp.path, token, chat_body())
        assert err.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
    finally:
        assert rp.stop() == 0


async def test_driver_reprepares_after_a_runner_restart(sock_dir: Path) -> None:
    first = start_runner(sock_dir)
    driver = ExtPluginDriver(first.path)
    chain = PluginChain("route#1", ((PF, '{"deny_patterns": ["forbidden"]}'),))
    try:
        resp = await driver.req_call(chain, call(), Apisix(chat_body("fine")))
        assert resp.action is None
        assert first.stop() == 0
        await driver.close()
        second = start_runner(sock_dir)  # same socket path, empty conf cache
        try:
            resp = await driver.req_call(chain, call(), Apisix(chat_body("forbidden")))
            status, body, _ = stop_json(resp)
            assert (status, body["error"]["code"]) == (400, "content_policy_violation")
        finally:
            assert second.stop() == 0
    finally:
        await driver.close()


# --- malformed input --------------------------------------------------------------------------


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _read_frame(s: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 4:
        chunk = s.recv(4 - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    msg_type, size = codec.parse_header(header)
    payload = b""
    while len(payload) < size:
        payload += s.recv(size - len(payload))
    return msg_type, payload


def _assert_bad_request(s: socket.socket) -> None:
    msg_type, payload = _read_frame(s)
    assert msg_type == MsgType.RPC_ERROR
    assert codec.decode_err_resp(payload).code == ErrCode.BAD_REQUEST


async def test_malformed_frames_never_take_the_runner_down(inproc_runner: str) -> None:
    def attack() -> None:
        # an unknown type byte: answered, and the connection stays usable
        s = _raw(inproc_runner)
        s.sendall(bytes([9, 0, 0, 3]) + b"abc")
        _assert_bad_request(s)
        # a payload that is not the expected table, then a truncated one on the same socket
        s.sendall(codec.frame(MsgType.RPC_HTTP_REQ_CALL, b"\xff" * 16))
        _assert_bad_request(s)
        s.sendall(codec.frame(MsgType.RPC_PREPARE_CONF, b"\x04\x00\x00\x00"))
        _assert_bad_request(s)
        # a PrepareConf reply type sent as a call (only the runner asks ExtraInfo)
        s.sendall(codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(b"x")))
        _assert_bad_request(s)
        s.close()
        # a frame cut short, then the peer leaves
        s = _raw(inproc_runner)
        s.sendall(bytes([2, 0, 0, 100]) + b"short")
        s.close()
        # the largest length the header can say, then nothing
        s = _raw(inproc_runner)
        s.sendall(bytes([2, 0xFF, 0xFF, 0xFF]) + b"\x00" * 1000)
        s.close()

    await asyncio.get_running_loop().run_in_executor(None, attack)
    token = await prepare(inproc_runner, [(PF, {})])
    resp, _ = await run_call(inproc_runner, token, chat_body())
    assert resp.action is None


async def test_a_full_16_mib_frame_is_read_and_answered(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [(PF, {"max_body_bytes": 1000})])
    big = b"x" * (codec.MAX_PAYLOAD - 64)
    resp, _ = await run_call(inproc_runner, token, big)
    status, body, _ = stop_json(resp)
    assert status == 413
    assert body["error"]["type"] == "invalid_request_error"


async def test_a_wrong_frame_instead_of_an_extra_info_answer_closes_the_connection(
    inproc_runner: str,
) -> None:
    token = await prepare(inproc_runner, [(PF, {})])
    conn = await RunnerConnection.open(inproc_runner)
    await conn.send(MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_req(call(token=token)))
    msg_type, _ = await conn.read()
    assert msg_type == MsgType.RPC_EXTRA_INFO  # it asks for the body
    await conn.send(MsgType.RPC_PREPARE_CONF, b"\x00" * 8)  # APISIX would never do this
    with pytest.raises(asyncio.IncompleteReadError):
        await conn.read()
    await conn.close()


async def test_peers_stalled_mid_frame_or_mid_exchange_are_closed(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins.runner import server

    monkeypatch.setattr(server, "FRAME_TIMEOUT_S", 0.3)
    monkeypatch.setattr(server, "WATCHDOG_EVERY_S", 0.05)
    runner = server.Runner(TEST_REGISTRY)
    path = str(sock_dir / "stall.sock")
    await runner.start(path)
    try:
        token = await prepare(path, [(PF, {})])

        def stall() -> None:
            idle = _raw(path)  # between exchanges a connection may idle as long as it likes
            cut = _raw(path)
            cut.sendall(bytes([2, 0, 0, 100]) + b"short")  # a frame begun, never ended
            asking = _raw(path)
            asking.sendall(
                codec.frame(
                    MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_req(call(token=token))
                )
            )
            assert _read_frame(asking)[0] == MsgType.RPC_EXTRA_INFO  # never answered
            for s in (cut, asking):
                s.settimeout(3)
                assert s.recv(16) == b""  # closed by the runner
            idle.sendall(codec.frame(MsgType.RPC_PREPARE_CONF, b"\x00" * 8))
            _assert_bad_request(idle)  # still served
            for s in (idle, cut, asking):
                s.close()

        await asyncio.get_running_loop().run_in_executor(None, stall)
    finally:
        await runner.stop(grace_s=0.2)


async def test_frames_split_across_writes_or_sent_together_are_answered_in_order(
    inproc_runner: str,
) -> None:
    token = await prepare(inproc_runner, [("test-stop", {"status": 201})])
    frames = b"".join(
        codec.frame(
            MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_req(call(id=i, token=token))
        )
        for i in range(1, 101)
    )

    def send() -> list[int]:
        s = _raw(inproc_runner)
        half = len(frames) // 2 + 3  # the cut falls inside a frame
        s.sendall(frames[:half])
        s.sendall(frames[half:])
        ids = [codec.decode_http_req_call_resp(_read_frame(s)[1]).id for _ in range(100)]
        s.close()
        return ids

    assert await asyncio.get_running_loop().run_in_executor(None, send) == list(range(1, 101))


# --- concurrency ------------------------------------------------------------------------------


async def test_200_concurrent_connections(runner_process: RunnerProcess) -> None:
    token = await prepare(runner_process.path, [(PF, {"max_prompt_tokens": 50})])

    async def one(i: int) -> None:
        long_text = i % 2 == 0
        body = chat_body("word " * 400 if long_text else f"Hello   number {i}")
        resp, _ = await run_call(runner_process.path, token, body, call(id=1000 + i))
        assert resp.id == 1000 + i
        if long_text:
            assert stop_json(resp)[1]["error"]["code"] == "context_length_exceeded"
        else:
            assert isinstance(resp.action, codec.Rewrite)
            assert orjson.loads(resp.action.body)["messages"][0]["content"] == f"Hello number {i}"

    await asyncio.gather(*(one(i) for i in range(200)))
    assert runner_process.stop() == 0


async def test_a_slow_plugin_on_one_connection_never_delays_another(inproc_runner: str) -> None:
    slow_token = await prepare(inproc_runner, [("test-slow", {"delay_ms": 1500})])
    fast_token = await prepare(inproc_runner, [(PF, {})])
    slow = asyncio.create_task(run_call(inproc_runner, slow_token, None))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(20):
        resp, _ = await run_call(inproc_runner, fast_token, chat_body())
        assert resp.action is None
    assert loop.time() - started < 1.0
    assert not slow.done()
    resp, _ = await slow
    assert isinstance(resp.action, codec.Rewrite)


async def test_many_calls_in_order_on_one_keepalive_connection(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [(PF, {"deny_patterns": ["bad"]})])
    conn = await RunnerConnection.open(inproc_runner)
    try:
        for i in range(300):
            text = "bad" if i % 3 == 0 else "good"
            resp = await conn.req_call(call(id=i, token=token), Apisix(chat_body(text)))
            assert resp.id == i
            assert (resp.action is None) == (text == "good")
    finally:
        await conn.close()


# --- checks a plugin defers --------------------------------------------------------------------


async def test_the_chain_goes_on_while_a_deferred_check_waits(inproc_runner: str) -> None:
    chain = [("test-defer", {"delay_ms": 50}), ("test-slow", {"delay_ms": 0})]
    resp, _ = await run_call(inproc_runner, await prepare(inproc_runner, chain), None)
    assert isinstance(resp.action, codec.Rewrite)
    assert resp.action.headers == [("x-slept-ms", "0")]
    # the later plugin had already run when the check finished, and the check's header is there
    assert resp.action.resp_headers == [("x-checked-after", "x-slept-ms")]


async def test_a_deferred_refusal_comes_before_what_a_later_plugin_decided(
    inproc_runner: str,
) -> None:
    chain = [("test-defer", {"delay_ms": 20, "outcome": "refuse"}), ("test-stop", {"status": 203})]
    resp, _ = await run_call(inproc_runner, await prepare(inproc_runner, chain), None)
    status, body, headers = stop_json(resp)
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert headers["retry-after"] == "3"
    assert headers["x-checked-after"] == "-"  # the stop decided first; the refusal still wins


async def test_a_deferred_check_that_fails_is_closed_or_open_as_its_plugin_says(
    inproc_runner: str,
) -> None:
    closed = [("test-defer", {"outcome": "crash"}), ("test-slow", {"delay_ms": 0})]
    resp, _ = await run_call(inproc_runner, await prepare(inproc_runner, closed), None)
    assert stop_json(resp)[0] == 500
    opened = [("test-defer", {"outcome": "crash", "on_error": "open"}), ("test-slow", {})]
    resp, _ = await run_call(inproc_runner, await prepare(inproc_runner, opened), None)
    assert isinstance(resp.action, codec.Rewrite)
    assert resp.action.headers == [("x-slept-ms", "0")]


async def test_questions_asked_before_a_call_that_then_fails_to_decode_keep_the_connection(
    inproc_runner: str,
) -> None:
    import struct

    token = await prepare(inproc_runner, [("test-prefetch", {"names": ["consumer_name"]})])
    payload = bytearray(codec.encode_http_req_call_req(call(token=token, headers=[("x-a", "b")])))
    start, count = tables.root(bytes(payload))._vector(5, 4)
    assert count == 1
    struct.pack_into("<I", payload, start, 0xFFFFFF00)  # the header entry points outside

    def exchange() -> tuple[int, int]:
        s = _raw(inproc_runner)
        s.sendall(codec.frame(MsgType.RPC_HTTP_REQ_CALL, bytes(payload)))
        asked = 0
        while True:  # the runner asked its questions before decoding the call: answer them
            msg_type, frame_payload = _read_frame(s)
            if msg_type != MsgType.RPC_EXTRA_INFO:
                break
            asked += 1
            s.sendall(codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(b"x")))
        s.close()
        return asked, codec.decode_err_resp(frame_payload).code

    asked, code = await asyncio.get_running_loop().run_in_executor(None, exchange)
    assert (asked, code) == (3, ErrCode.BAD_REQUEST)  # consumer_name, remote_addr, the body
