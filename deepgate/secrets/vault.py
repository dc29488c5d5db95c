"""Vault and OpenBao through ``hvac``: KV version 2 reads and the transit engine's data keys.

The server is VAULT_ADDR with the token VAULT_TOKEN (the usual Vault variables; VAULT_TOKEN may
itself be a ``$file://`` reference, e.g. a token file written by Vault Agent). Transit calls use
the mount DEEPGATE_VAULT_TRANSIT_MOUNT (default ``transit``). Errors say which reference or key,
which server and what to check; Vault's own error text is kept (it never holds a secret value).
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import hvac
import hvac.exceptions
import requests

from deepgate.secrets import VAULT, SecretError

ADDR_ENV: Final = "VAULT_ADDR"
TOKEN_ENV: Final = "VAULT_TOKEN"  # noqa: S105 - the variable's name
TRANSIT_MOUNT_ENV: Final = "DEEPGATE_VAULT_TRANSIT_MOUNT"
TIMEOUT_S: Final = 5.0

T = TypeVar("T")

_clients: dict[tuple[str, str], hvac.Client] = {}
_lock = threading.Lock()


def configured() -> bool:
    """True when VAULT_ADDR is set (the transit engine is then the default for sealing)."""
    return bool(os.environ.get(ADDR_ENV))


def client() -> hvac.Client:
    addr = os.environ.get(ADDR_ENV)
    if not addr:
        raise SecretError(
            f"no Vault is configured: set {ADDR_ENV} (and {TOKEN_ENV}) to read $vault:// "
            "references or to use the transit engine"
        )
    token = os.environ.get(TOKEN_ENV)
    if token and token.startswith("$"):
        from deepgate.secrets import resolve

        token = resolve(token)
    if not token:
        raise SecretError(f"{TOKEN_ENV} is not set; give the token deepgate uses at {addr}")
    with _lock:
        found = _clients.get((addr, token))
        if found is None:
            found = hvac.Client(url=addr, token=token, timeout=TIMEOUT_S)
            _clients.clear()  # one server, one token at a time: drop a rotated token's client
            _clients[(addr, token)] = found
    return found


def _call(what: str, fix: str, fn: Callable[[], T]) -> T:
    """Run one Vault request; turn its failures into SecretError naming ``what``."""
    addr = os.environ.get(ADDR_ENV, "")
    try:
        return fn()
    except hvac.exceptions.InvalidPath:
        raise SecretError(f"{what}: not found at {addr}; {fix}") from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
        raise SecretError(
            f"{what}: permission denied by {addr}; check that {TOKEN_ENV} is valid and its "
            "policy allows this path"
        ) from None
    except hvac.exceptions.VaultDown:
        raise SecretError(f"{what}: the Vault at {addr} is sealed; unseal it") from None
    except hvac.exceptions.VaultError as exc:
        errors = "; ".join(str(e) for e in (exc.errors or [])) or type(exc).__name__
        hint = f"; {fix}" if "not found" in errors else ""
        raise SecretError(f"{what}: {addr} answered: {errors}{hint}") from None
    except requests.RequestException as exc:
        raise SecretError(
            f"{what}: cannot reach the Vault at {addr} ({type(exc).__name__}); check {ADDR_ENV} "
            "and that the server is up"
        ) from None


def parse_ref(ref: str) -> tuple[str, str, str]:
    """``$vault://MOUNT/PATH#KEY`` → (mount, path, key)."""
    body = ref[len(VAULT) :]
    location, sep, key = body.partition("#")
    mount, slash, path = location.strip("/").partition("/")
    if not sep or not key or not slash or not mount or not path:
        raise SecretError(
            f"{ref}: a Vault reference is $vault://MOUNT/PATH#KEY, e.g. "
            "$vault://secret/deepgate/openai#api_key"
        )
    return mount, path, key


def read_ref(ref: str) -> str:
    """The field KEY of the KV v2 secret named by a ``$vault://`` reference (latest version)."""
    mount, path, key = parse_ref(ref)
    vault = client()
    response = _call(
        ref,
        f"write it with `bao kv put -mount={mount} {path} {key}=...` or fix the path",
        lambda: vault.secrets.kv.v2.read_secret_version(
            path=path, mount_point=mount, raise_on_deleted_version=True
        ),
    )
    data: Any = (response.get("data") or {}).get("data") or {}
    if key not in data:
        keys = ", ".join(sorted(str(k) for k in data)) or "none"
        raise SecretError(f"{ref}: the secret has no key {key!r} (its keys: {keys})")
    value = data[key]
    if not isinstance(value, str):
        raise SecretError(f"{ref}: the value of {key!r} is not a string")
    return value


def _mount() -> str:
    return os.environ.get(TRANSIT_MOUNT_ENV) or "transit"


def ensure_transit_key(name: str) -> None:
    """Create the transit key ``name`` (aes256-gcm96) unless it exists."""
    vault = client()
    mount = _mount()
    what = f"transit key {name!r} (mount {mount!r})"
    fix = f"enable the engine with `bao secrets enable -path={mount} transit`"

    def exists() -> bool:
        try:
            vault.secrets.transit.read_key(name=name, mount_point=mount)
        except hvac.exceptions.InvalidPath:
            return False
        return True

    if not _call(what, fix, exists):
        _call(what, fix, lambda: vault.secrets.transit.create_key(name=name, mount_point=mount))


def data_key(name: str) -> tuple[bytes, str]:
    """A new 256-bit data key from transit: (plaintext key, the key wrapped by ``name``)."""
    vault = client()
    mount = _mount()
    response = _call(
        f"transit key {name!r} (mount {mount!r})",
        f"create it: `deepgate secrets seal --create-key` or `bao write -f {mount}/keys/{name}`",
        lambda: vault.secrets.transit.generate_data_key(
            name=name, key_type="plaintext", bits=256, mount_point=mount
        ),
    )
    data = response["data"]
    return base64.b64decode(data["plaintext"]), str(data["ciphertext"])


def unwrap(name: str, wrapped: str) -> bytes:
    """The plaintext of a data key wrapped by the transit key ``name``."""
    vault = client()
    mount = _mount()
    response = _call(
        f"transit key {name!r} (mount {mount!r})",
        "the key that sealed this value is gone or the token may not decrypt with it",
        lambda: vault.secrets.transit.decrypt_data(
            name=name, ciphertext=wrapped, mount_point=mount
        ),
    )
    return base64.b64decode(response["data"]["plaintext"])


def rewrap(name: str, wrapped: str) -> str:
    """The same data key wrapped by the latest version of the transit key ``name``."""
    vault = client()
    mount = _mount()
    response = _call(
        f"transit key {name!r} (mount {mount!r})",
        "check the key name",
        lambda: vault.secrets.transit.rewrap_data(name=name, ciphertext=wrapped, mount_point=mount),
    )
    return str(response["data"]["ciphertext"])


def rotate_key(name: str) -> None:
    """A new version of the transit key ``name`` (old versions still decrypt)."""
    vault = client()
    mount = _mount()
    _call(
        f"transit key {name!r} (mount {mount!r})",
        "check the key name",
        lambda: vault.secrets.transit.rotate_key(name=name, mount_point=mount),
    )
