"""Secret references without Vault: $env, $file, local sealing, the TTL cache, the CLI."""

from __future__ import annotations

import argparse
import io
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepgate import secrets
from deepgate.config import ConfigError, is_secret_ref, resolve_secret
from deepgate.secrets import SecretError, SecretRef, resolve, sealed
from sidecar import secrets_cli

VALUE = "sk-live-Zq9mXv2T7pLw4RkS"  # what must never show up in a message or a log


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "DEEPGATE_SEAL_KEY", "DEEPGATE_SEAL_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "60")
    secrets.clear_cache()
    yield
    secrets.clear_cache()


@pytest.fixture
def local_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "seal.key"
    path.write_text(sealed.generate_local_key() + "\n")
    monkeypatch.setenv("DEEPGATE_SEAL_KEY_FILE", str(path))
    return path


def test_references_of_every_kind_are_recognised() -> None:
    for ref in ("$env://A", "$file:///x", "$vault://secret/a#k", "$sealed://dg1.local.x.y.z"):
        assert secrets.is_ref(ref)
        assert is_secret_ref(ref)
    for plain in ("sk-123", "env://A", "$other://x", ""):
        assert not secrets.is_ref(plain)
    assert resolve("plain-value") == "plain-value"


def test_env_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DG_TEST_KEY", VALUE)
    assert resolve("$env://DG_TEST_KEY") == VALUE
    monkeypatch.setenv("DG_TEST_KEY", "changed")
    assert resolve("$env://DG_TEST_KEY") == "changed"  # read each time, never cached
    monkeypatch.delenv("DG_TEST_KEY")
    with pytest.raises(SecretError, match=r"DG_TEST_KEY is not set.*\$env://DG_TEST_KEY"):
        resolve("$env://DG_TEST_KEY")


def test_secret_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        resolve_secret("$env://DG_SURELY_UNSET_VARIABLE")


def test_file_reference(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(VALUE + "\n")
    assert resolve(f"$file://{path}") == VALUE  # one trailing newline dropped


def test_file_errors_name_the_reference(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SecretError, match="does not exist") as err:
        resolve(f"$file://{missing}")
    assert f"$file://{missing}" in str(err.value)
    unreadable = tmp_path / "locked"
    unreadable.write_text(VALUE)
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):  # running as root: permissions do not apply
        return
    with pytest.raises(SecretError, match="cannot be read") as err:
        resolve(f"$file://{unreadable}")
    assert VALUE not in str(err.value)


def test_a_cached_value_is_kept_for_the_ttl_then_reread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "0.3")
    path = tmp_path / "key"
    path.write_text("old-key")
    ref = f"$file://{path}"
    assert resolve(ref) == "old-key"
    path.write_text("new-key")
    assert resolve(ref) == "old-key"  # within the TTL
    assert secrets.cached(ref) == "old-key"
    time.sleep(0.35)
    assert secrets.cached(ref) is None
    assert resolve(ref) == "new-key"


def test_a_failed_refresh_keeps_the_last_value_and_logs_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DEEPGATE_SECRET_TTL_S", "0")
    path = tmp_path / "key"
    path.write_text(VALUE)
    ref = f"$file://{path}"
    assert resolve(ref) == VALUE
    path.unlink()
    with caplog.at_level(logging.DEBUG):
        assert resolve(ref) == VALUE
    assert any(ref in r.getMessage() for r in caplog.records)
    assert VALUE not in caplog.text


async def test_secret_ref_reads_in_a_thread_and_then_from_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(VALUE)
    key = SecretRef(f"$file://{path}")
    assert await key.get() == VALUE
    path.write_text("other")
    assert await key.get() == VALUE
    assert VALUE not in repr(key)


def test_local_seal_and_open(local_key: Path) -> None:
    token = sealed.seal(VALUE)
    assert token.backend == "local"
    assert VALUE not in token.ref()
    assert resolve(token.ref()) == VALUE
    again = sealed.seal(VALUE)
    assert again.ref() != token.ref()  # a new data key and nonce each time


def test_a_sealed_value_in_a_file_or_variable_is_opened(
    local_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = sealed.seal(VALUE).ref()
    path = tmp_path / "openai.sealed"
    path.write_text(token + "\n")
    assert resolve(f"$file://{path}") == VALUE
    monkeypatch.setenv("DG_SEALED", token)
    assert resolve("$env://DG_SEALED") == VALUE


def test_a_token_opened_with_another_key_says_which(
    local_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = sealed.seal(VALUE)
    other = tmp_path / "other.key"
    other.write_text(sealed.generate_local_key())
    monkeypatch.setenv("DEEPGATE_SEAL_KEY_FILE", str(other))
    with pytest.raises(SecretError, match=f"sealed with local key {token.key_id}") as err:
        resolve(token.ref())
    assert VALUE not in str(err.value)


def test_a_damaged_or_spliced_token_does_not_open(local_key: Path) -> None:
    a = sealed.seal(VALUE).text().split(".")
    b = sealed.seal("another-value").text().split(".")
    spliced = ".".join([*a[:4], b[4]])  # a's data key, b's ciphertext
    with pytest.raises(SecretError, match="does not open"):
        resolve("$sealed://" + spliced)
    flipped = a[4][:-2] + ("A" if a[4][-2] != "A" else "B") + a[4][-1]
    with pytest.raises(SecretError, match="does not open"):
        resolve("$sealed://" + ".".join([*a[:4], flipped]))
    with pytest.raises(SecretError, match="not a sealed value"):
        resolve("$sealed://hello")


def test_sealing_without_any_key_says_how_to_get_one() -> None:
    with pytest.raises(SecretError, match=r"VAULT_ADDR.*DEEPGATE_SEAL_KEY_FILE"):
        sealed.seal(VALUE)


def test_local_reseal_with_a_new_value(local_key: Path) -> None:
    token = sealed.seal(VALUE)
    rotated = sealed.reseal(token.text(), "sk-rotated")
    assert resolve(rotated.ref()) == "sk-rotated"
    same = sealed.reseal(token.text())
    assert same.ref() != token.ref()
    assert resolve(same.ref()) == VALUE


# --- the deepgate secrets command ---------------------------------------------------------


class Cli:
    """Runs ``deepgate secrets ...`` in-process with a given stdin; returns (rc, out, err)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
        self.monkeypatch = monkeypatch
        self.capsys = capsys

    def __call__(self, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        secrets_cli.add_arguments(parser)
        args = parser.parse_args(argv)
        self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        rc = secrets_cli.run(args)
        captured = self.capsys.readouterr()
        return rc, captured.out, captured.err


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(monkeypatch, capsys)


def test_cli_keygen_seal_open_rotate(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "seal.key"
    assert cli(["keygen", "--out", str(key)])[0] == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    monkeypatch.setenv("DEEPGATE_SEAL_KEY_FILE", str(key))

    sealed_file = tmp_path / "secrets" / "openai.sealed"
    rc, out, err = cli(["seal", "--out", str(sealed_file)], stdin=VALUE + "\n")
    assert rc == 0
    assert VALUE not in out + err
    assert stat.S_IMODE(sealed_file.stat().st_mode) == 0o600
    assert resolve(f"$file://{sealed_file}") == VALUE

    rc, out, _ = cli(["open", "--file", str(sealed_file)])
    assert (rc, out) == (0, VALUE + "\n")

    rc, out, _ = cli(["seal"], stdin=VALUE)
    assert out.startswith("$sealed://dg1.local.")
    assert cli(["open", out.strip()])[1] == VALUE + "\n"

    rc, out, err = cli(["rotate", "--file", str(sealed_file), "--new-value"], stdin="sk-new")
    assert rc == 0
    assert "sk-new" not in out + err
    secrets.clear_cache()
    assert resolve(f"$file://{sealed_file}") == "sk-new"


def test_cli_errors_name_the_problem_not_the_value(cli: Cli, tmp_path: Path) -> None:
    rc, out, err = cli(["seal"], stdin=VALUE)
    assert rc == 1
    assert "DEEPGATE_SEAL_KEY_FILE" in err
    assert VALUE not in out + err
    rc, _, err = cli(["seal"], stdin="")
    assert rc == 1
    assert "no value on stdin" in err
    key = tmp_path / "k"
    key.write_text("x")
    rc, _, err = cli(["keygen", "--out", str(key)])
    assert rc == 1
    assert "exists" in err
