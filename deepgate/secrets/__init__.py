"""Secret references: one resolver for every config value that holds a key, a password or a DSN.

A config never holds a secret, only a reference to it:

``$env://NAME``
    the environment variable NAME (read on every resolution; not cached).
``$file://PATH``
    the contents of the file PATH, one trailing newline removed (a Kubernetes or Docker secret).
``$vault://MOUNT/PATH#KEY``
    the field KEY of the KV version 2 secret PATH under the mount MOUNT, read from Vault or
    OpenBao at VAULT_ADDR with VAULT_TOKEN (``$vault://secret/deepgate/openai#api_key``).
``$sealed://TOKEN``
    a value sealed by ``deepgate secrets seal`` (envelope encryption: a data key from Vault's
    transit engine or from a local key encrypts the value with AES-GCM; see ``sealed``).

A value read through ``$env``, ``$file`` or ``$vault`` that is itself a ``$sealed://`` token is
opened too, so a sealed provider key can live in a file or a KV entry. File, Vault and sealed
values are cached for DEEPGATE_SECRET_TTL_S seconds (default 60): a key rotated at the source is
picked up by the next resolution after that, without a restart. When a refresh fails the last
value is kept (and the failure logged) until the source answers again.

Errors name the reference and what to do, never the value; nothing here logs a value.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from deepgate.config import ConfigError

log = logging.getLogger("deepgate.secrets")

ENV: Final = "$env://"
FILE: Final = "$file://"
VAULT: Final = "$vault://"
SEALED: Final = "$sealed://"
PREFIXES: Final = (ENV, FILE, VAULT, SEALED)

TTL_ENV: Final = "DEEPGATE_SECRET_TTL_S"
DEFAULT_TTL_S: Final = 60.0
_RETRY_AFTER_FAILURE_S: Final = 5.0


class SecretError(ConfigError):
    """A reference cannot be resolved; the message names the reference (never a value)."""


def is_ref(value: str) -> bool:
    """True for ``$env://``, ``$file://``, ``$vault://`` and ``$sealed://`` references."""
    return value.startswith(PREFIXES)


def ttl_s() -> float:
    raw = os.environ.get(TTL_ENV)
    if not raw:
        return DEFAULT_TTL_S
    try:
        value = float(raw)
    except ValueError:
        raise SecretError(f"{TTL_ENV} must be a number of seconds (got a non-number)") from None
    if value < 0:
        raise SecretError(f"{TTL_ENV} must be zero or more seconds")
    return value


@dataclass(slots=True)
class _Entry:
    value: str
    expires: float


_cache: dict[str, _Entry] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached value (the next resolution reads each source again)."""
    with _cache_lock:
        _cache.clear()


def cached(ref: str) -> str | None:
    """The cached value of ``ref`` while it is fresh, else None (never blocks, never reads)."""
    if ref.startswith(ENV):
        return _read_env(ref)
    if not is_ref(ref):
        return ref
    entry = _cache.get(ref)
    if entry is not None and time.monotonic() < entry.expires:
        return entry.value
    return None


def resolve(ref: str) -> str:
    """The value behind a reference; a string that is not a reference is returned as given.

    Blocking (a file read or a Vault request when the cached value has expired): from async
    code prefer ``SecretRef.get()``.
    """
    if ref.startswith(ENV):
        value = _read_env(ref)
        if value is None:
            name = ref[len(ENV) :]
            raise SecretError(f"the environment variable {name} is not set; set it or change {ref}")
        return _open_if_sealed(value, ref)
    if not is_ref(ref):
        return ref
    now = time.monotonic()
    entry = _cache.get(ref)
    if entry is not None and now < entry.expires:
        return entry.value
    try:
        value = _read(ref)
    except SecretError as exc:
        if entry is None:
            raise
        # Keep serving the last value: a Vault restart must not take every provider down.
        log.warning("secret refresh failed, keeping the cached value: %s", exc)
        with _cache_lock:
            _cache[ref] = _Entry(entry.value, now + min(_RETRY_AFTER_FAILURE_S, ttl_s()))
        return entry.value
    with _cache_lock:
        _cache[ref] = _Entry(value, now + ttl_s())
    return value


def _read_env(ref: str) -> str | None:
    return os.environ.get(ref[len(ENV) :])


def _read(ref: str) -> str:
    if ref.startswith(FILE):
        return _open_if_sealed(_read_file(ref), ref)
    if ref.startswith(VAULT):
        from deepgate.secrets import vault

        return _open_if_sealed(vault.read_ref(ref), ref)
    from deepgate.secrets import sealed

    return sealed.open_token(ref[len(SEALED) :], ref)


def _read_file(ref: str) -> str:
    path = Path(ref[len(FILE) :])
    if not str(path):
        raise SecretError(f"{ref}: give a file path after $file://")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretError(f"{ref}: the file does not exist; create it or change the path") from None
    except PermissionError:
        raise SecretError(
            f"{ref}: the file cannot be read by this process; check its owner and mode"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        what = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SecretError(f"{ref}: cannot read the file ({what})") from None
    return text.removesuffix("\n").removesuffix("\r")


def _open_if_sealed(value: str, ref: str) -> str:
    if not value.startswith(SEALED):
        return value
    entry = _cache.get(value)  # keyed by the token: an $env:// value is not cached itself
    now = time.monotonic()
    if entry is not None and now < entry.expires:
        return entry.value
    from deepgate.secrets import sealed

    opened = sealed.open_token(value[len(SEALED) :], ref)
    with _cache_lock:
        _cache[value] = _Entry(opened, now + ttl_s())
    return opened


class SecretRef:
    """A reference resolved on use, for code on an event loop (e.g. a provider's API key).

    ``get()`` answers from the cache while it is fresh and otherwise reads the source in a worker
    thread, so a Vault round trip never blocks the loop.
    """

    __slots__ = ("ref",)

    def __init__(self, ref: str) -> None:
        self.ref = ref

    async def get(self) -> str:
        value = cached(self.ref)
        if value is not None:
            return value
        return await asyncio.to_thread(resolve, self.ref)

    def __repr__(self) -> str:  # the reference, never the value
        return f"SecretRef({self.ref!r})"


__all__ = [
    "DEFAULT_TTL_S",
    "ENV",
    "FILE",
    "SEALED",
    "TTL_ENV",
    "VAULT",
    "SecretError",
    "SecretRef",
    "cached",
    "clear_cache",
    "is_ref",
    "resolve",
    "ttl_s",
]
