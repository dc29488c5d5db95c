"""deepgate.config: strict models, the YAML loader's errors, secret references."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deepgate.config import ConfigError, StrictModel, is_secret_ref, load_model, resolve_secret


class Upstream(StrictModel):
    host: str
    port: int = 443


class Gateway(StrictModel):
    name: str
    api_key: str
    upstreams: list[Upstream]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_strict_model_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match=r"Extra inputs are not permitted"):
        Upstream.model_validate({"host": "h", "prot": 80})


def test_strict_model_is_immutable() -> None:
    up = Upstream(host="h")
    with pytest.raises(ValidationError):
        up.port = 80  # type: ignore[misc]


def test_load_model_reads_a_good_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name: edge\napi_key: $env://EDGE_KEY\nupstreams:\n  - host: a.example\n"
        "  - host: b.example\n    port: 8443\n",
    )
    gw = load_model(path, Gateway)
    assert gw.name == "edge"
    assert gw.api_key == "$env://EDGE_KEY"
    assert gw.upstreams == [Upstream(host="a.example"), Upstream(host="b.example", port=8443)]


def test_load_model_error_names_file_and_path_without_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name: edge\napi_key: $env://EDGE_KEY\nupstreams:\n"
        "  - host: a.example\n    port: sk-live-SECRET-1\n"
        "  - host: b.example\n    tls_password: hunter2-SECRET-2\n",
    )
    with pytest.raises(ConfigError) as info:
        load_model(path, Gateway)
    msg = str(info.value)
    assert str(path) in msg
    assert "upstreams.0.port" in msg
    assert "upstreams.1.tls_password" in msg
    assert "SECRET" not in msg


def test_load_model_missing_key_names_it(tmp_path: Path) -> None:
    path = write(tmp_path, "name: edge\nupstreams: []\n")
    with pytest.raises(ConfigError, match=r"api_key: Field required"):
        load_model(path, Gateway)


def test_load_model_empty_file_is_a_top_level_error(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_model(path, Gateway)
    assert str(path) in str(info.value)
    assert "(top level)" in str(info.value)


def test_load_model_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_model(path, Gateway)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_load_model_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: edge\napi_key: [sk-live-SECRET-3\n")
    with pytest.raises(ConfigError) as info:
        load_model(path, Gateway)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 2" in msg
    # A syntax error must not print the offending line: it may hold an inlined secret.
    assert "SECRET" not in msg


def test_resolve_secret_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_TEST_KEY", "sk-from-env")
    assert resolve_secret("$env://DEEPGATE_TEST_KEY") == "sk-from-env"


def test_resolve_secret_unset_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPGATE_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="DEEPGATE_TEST_KEY is not set"):
        resolve_secret("$env://DEEPGATE_TEST_KEY")


def test_resolve_secret_set_to_empty_is_still_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_TEST_KEY", "")
    assert resolve_secret("$env://DEEPGATE_TEST_KEY") == ""


def test_resolve_secret_passes_plain_values_through() -> None:
    assert resolve_secret("plain-value") == "plain-value"
    assert resolve_secret("env://NOT_A_REF") == "env://NOT_A_REF"


def test_is_secret_ref() -> None:
    assert is_secret_ref("$env://X")
    assert not is_secret_ref("sk-123")
