"""Secrets against a real OpenBao dev server: KV v2 reads, transit envelopes, rotation with TTL.

The server is the ``bao`` binary from the project's venv, started once for this module in dev
mode (in memory, unsealed, a random root token) on a free port; it serves the Vault API.
"""

from __future__ import annotations

import logging
import os
import secrets as pysecrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest
import requests

from deepgate import secrets
from deepgate.secrets import SecretError, resolve, sealed, vault
from sidecar.app import build_provider
from sidecar.config import ProviderConfig
from sidecar.providers.base import CallOptions
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeOpenAI

BAO = Path(sys.executable).with_name("bao")
OLD_KEY = "sk-old-4f9Qa7ZxR2mLp8Tn"
NEW_KEY = "sk-new-8HcV3bWq1YsK6dJe"


@dataclass
class OpenBao:
    addr: str
    token: str

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.token)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    token = pysecrets.token_hex(16)
    addr = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path_factory.mktemp("openbao") / "bao.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                str(BAO),
                "server",
                "-dev",
                f"-dev-root-token-id={token}",
                f"-dev-listen-address={addr.removeprefix('http://')}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(log_path.parent)},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{addr}/v1/sys/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        bao = OpenBao(addr, token)
        bao.client().sys.enable_secrets_engine("transit")
        yield bao
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def env(openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenBao]:
    monkeypatch.setenv("VAULT_ADDR", openbao.addr)
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "60")
    for name in ("DEEPGATE_SEAL_KEY", "DEEPGATE_SEAL_KEY_FILE", "DEEPGATE_VAULT_TRANSIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    secrets.clear_cache()
    yield openbao
    secrets.clear_cache()


def put(bao: OpenBao, path: str, **data: str) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point="secret")


def test_kv_v2_read(env: OpenBao) -> None:
    put(env, "deepgate/openai", api_key=OLD_KEY, org="acme")
    assert resolve("$vault://secret/deepgate/openai#api_key") == OLD_KEY
    assert resolve("$vault://secret/deepgate/openai#org") == "acme"


def test_kv_errors_name_the_reference_never_a_value(
    env: OpenBao, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    put(env, "deepgate/errors", api_key=OLD_KEY)
    cases = {
        "$vault://secret/deepgate/absent#api_key": "not found",
        "$vault://secret/deepgate/errors#nope": "has no key 'nope' (its keys: api_key)",
        "$vault://secret#api_key": "$vault://MOUNT/PATH#KEY",
        "$vault://secret/deepgate/errors": "$vault://MOUNT/PATH#KEY",
    }
    with caplog.at_level(logging.DEBUG):
        for ref, words in cases.items():
            with pytest.raises(SecretError) as err:
                resolve(ref)
            message = str(err.value)
            assert ref in message
            assert words in message
            assert OLD_KEY not in message
        monkeypatch.setenv("VAULT_TOKEN", "not-the-token")
        with pytest.raises(SecretError, match="permission denied") as err:
            resolve("$vault://secret/deepgate/errors#api_key")
        assert "not-the-token" not in str(err.value)
        monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(SecretError, match="cannot reach") as err:
            resolve("$vault://secret/deepgate/errors#api_key")
    assert OLD_KEY not in caplog.text
    assert env.token not in caplog.text


def test_transit_envelope_seal_and_open(env: OpenBao) -> None:
    vault.ensure_transit_key("deepgate")
    vault.ensure_transit_key("deepgate")  # idempotent
    token = sealed.seal(OLD_KEY)
    assert token.backend == "transit"
    assert token.key_id == "deepgate"
    assert token.wrapped.startswith(b"vault:v")  # transit's ciphertext of the data key
    assert OLD_KEY not in token.ref()
    assert resolve(token.ref()) == OLD_KEY
    # the data key really is transit's: decrypting it with OpenBao and AES-GCM opens the value
    data_key = vault.unwrap("deepgate", token.wrapped.decode())
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    opened = AESGCM(data_key).decrypt(token.payload[:12], token.payload[12:], token.aad)
    assert opened.decode() == OLD_KEY


def test_transit_key_rotation_and_rewrap(env: OpenBao) -> None:
    vault.ensure_transit_key("rotating")
    token = sealed.seal(OLD_KEY, "transit", "rotating")
    before = token.wrapped.decode().split(":")[1]
    rewrapped = sealed.reseal(token.text(), rotate_key=True)
    after = rewrapped.wrapped.decode().split(":")[1]
    assert int(after.removeprefix("v")) == int(before.removeprefix("v")) + 1
    assert rewrapped.payload == token.payload  # the value was never decrypted to rewrap
    assert resolve(rewrapped.ref()) == OLD_KEY
    assert resolve(token.ref()) == OLD_KEY  # old versions still open until trimmed


def test_a_missing_transit_key_says_how_to_create_it(env: OpenBao) -> None:
    with pytest.raises(SecretError, match="create it") as err:
        sealed.seal(OLD_KEY, "transit", "never-created")
    assert OLD_KEY not in str(err.value)


def test_a_rotated_kv_secret_is_picked_up_after_the_ttl(
    env: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "0.5")
    ref = "$vault://secret/deepgate/rotation#api_key"
    put(env, "deepgate/rotation", api_key=OLD_KEY)
    assert resolve(ref) == OLD_KEY
    put(env, "deepgate/rotation", api_key=NEW_KEY)
    assert resolve(ref) == OLD_KEY  # cached
    time.sleep(0.55)
    assert resolve(ref) == NEW_KEY


def test_vault_down_keeps_the_cached_value(
    env: OpenBao, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "0")
    ref = "$vault://secret/deepgate/outage#api_key"
    put(env, "deepgate/outage", api_key=OLD_KEY)
    assert resolve(ref) == OLD_KEY
    monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="deepgate.secrets"):
        assert resolve(ref) == OLD_KEY
    assert "keeping the cached value" in caplog.text
    assert ref in caplog.text
    assert OLD_KEY not in caplog.text


# --- the provider adapters pick up a rotated key -------------------------------------------


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI("openai")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def anthropic_fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await server.start()
    yield server
    await server.stop()


BODY = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}


async def test_the_openai_adapter_uses_a_key_rotated_in_vault(
    env: OpenBao, monkeypatch: pytest.MonkeyPatch, openai_fake: FakeOpenAI
) -> None:
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "0.5")
    put(env, "deepgate/provider", api_key=OLD_KEY)
    conf = ProviderConfig(
        kind="openai_compat",
        api_key="$vault://secret/deepgate/provider#api_key",
        base_url=f"{openai_fake.url}/v1",
    )
    provider = build_provider("openai", conf, 5.0)
    assert provider is not None
    opts = CallOptions(model="gpt-4.1-mini", timeout_s=10)
    try:
        await provider.complete(BODY, opts)
        put(env, "deepgate/provider", api_key=NEW_KEY)
        await provider.complete(BODY, opts)  # within the TTL: still the old key
        await asyncio_sleep(0.55)
        await provider.complete(BODY, opts)
        chunks = [c async for c in provider.stream(BODY, opts)]
        assert chunks
    finally:
        await provider.aclose()
    auth = [r.headers.get("Authorization") for r in openai_fake.received]
    assert auth == [
        f"Bearer {OLD_KEY}",
        f"Bearer {OLD_KEY}",
        f"Bearer {NEW_KEY}",
        f"Bearer {NEW_KEY}",
    ]


async def test_the_anthropic_adapter_uses_a_rotated_sealed_key(
    env: OpenBao, monkeypatch: pytest.MonkeyPatch, anthropic_fake: FakeAnthropic, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "0.5")
    vault.ensure_transit_key("deepgate")
    key_file = tmp_path / "anthropic.sealed"
    key_file.write_text(sealed.seal(OLD_KEY).ref() + "\n")
    conf = ProviderConfig(
        kind="anthropic", api_key=f"$file://{key_file}", base_url=anthropic_fake.url
    )
    provider = build_provider("anthropic", conf, 5.0)
    assert provider is not None
    opts = CallOptions(model="claude-haiku-4-5", timeout_s=10)
    try:
        await provider.complete(BODY, opts)
        key_file.write_text(sealed.reseal(key_file.read_text(), NEW_KEY).ref() + "\n")
        await asyncio_sleep(0.55)
        await provider.complete(BODY, opts)
    finally:
        await provider.aclose()
    keys = [
        next(k for k in (OLD_KEY, NEW_KEY) if any(k in v for v in r.headers.values()))
        for r in anthropic_fake.received
    ]
    assert keys == [OLD_KEY, NEW_KEY]


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
