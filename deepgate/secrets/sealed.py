"""Envelope encryption of provider keys at rest: ``$sealed://`` tokens.

Sealing a value takes a fresh 256-bit data key, encrypts the value with it (AES-GCM, a random
96-bit nonce) and keeps only the data key *wrapped* by a key-encryption key:

* ``transit``: the data key comes from Vault/OpenBao's transit engine
  (``transit/datakey/plaintext/<name>``) and is stored as transit's ciphertext (``vault:vN:...``);
  opening asks transit to decrypt it. The key-encryption key never leaves Vault, and
  ``transit/keys/<name>/rotate`` + rewrap moves old tokens to the new key version.
* ``local``: no Vault; the data key is wrapped with AES-GCM under a local 256-bit key, read from
  DEEPGATE_SEAL_KEY (base64) or the file named by DEEPGATE_SEAL_KEY_FILE (base64, one line;
  ``deepgate secrets keygen`` writes one).

A token is five dot-separated fields, all ASCII::

    dg1.<backend>.<key id>.<wrapped data key, base64url>.<nonce + ciphertext, base64url>

where the key id is the transit key name, or the first 8 hex digits of SHA-256 of the local key
(so a token opened with the wrong local key says so). ``dg1.<backend>.<key id>`` is the AES-GCM
associated data of both encryptions: a token's parts cannot be swapped with another's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from deepgate.secrets import SEALED, SecretError

VERSION: Final = "dg1"
KEY_ENV: Final = "DEEPGATE_SEAL_KEY"
KEY_FILE_ENV: Final = "DEEPGATE_SEAL_KEY_FILE"
TRANSIT_KEY_ENV: Final = "DEEPGATE_VAULT_TRANSIT_KEY"
DEFAULT_TRANSIT_KEY: Final = "deepgate"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

Backend = Literal["transit", "local"]


@dataclass(frozen=True, slots=True)
class Token:
    backend: Backend
    key_id: str
    wrapped: bytes
    payload: bytes

    @property
    def aad(self) -> bytes:
        return f"{VERSION}.{self.backend}.{self.key_id}".encode()

    def text(self) -> str:
        return ".".join(
            (VERSION, self.backend, self.key_id, _b64(self.wrapped), _b64(self.payload))
        )

    def ref(self) -> str:
        return SEALED + self.text()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse(text: str, ref: str) -> Token:
    text = text.removeprefix(SEALED).strip()
    parts = text.split(".")
    if len(parts) != 5 or parts[0] != VERSION or parts[1] not in ("transit", "local"):
        raise SecretError(
            f"{_name(ref)}: not a sealed value (expected {VERSION}.<backend>.<key>.<...>.<...> "
            "as written by `deepgate secrets seal`)"
        )
    backend: Backend = "transit" if parts[1] == "transit" else "local"
    try:
        return Token(backend, parts[2], _unb64(parts[3]), _unb64(parts[4]))
    except (binascii.Error, ValueError):
        raise SecretError(f"{_name(ref)}: the sealed value is damaged (bad base64)") from None


def _name(ref: str) -> str:
    """How an error names a reference: a sealed token is shortened (it is long, not secret)."""
    return ref if not ref.startswith(SEALED) or len(ref) <= 48 else ref[:44] + "..."


# ---------------------------------------------------------------------------------------------
# Key-encryption keys


def generate_local_key() -> str:
    """A new local key, base64 (for DEEPGATE_SEAL_KEY or a DEEPGATE_SEAL_KEY_FILE file)."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def local_key() -> bytes:
    raw = os.environ.get(KEY_ENV)
    source = KEY_ENV
    if not raw:
        path = os.environ.get(KEY_FILE_ENV)
        if not path:
            raise SecretError(
                f"no sealing key: set VAULT_ADDR to use Vault's transit engine, or {KEY_FILE_ENV} "
                f"(a file from `deepgate secrets keygen`) or {KEY_ENV} for a local key"
            )
        source = f"{KEY_FILE_ENV} ({path})"
        try:
            raw = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise SecretError(f"{source}: cannot read the sealing key file") from None
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"{source}: the sealing key is not base64") from None
    if len(key) != 32:
        raise SecretError(f"{source}: the sealing key must be 32 bytes (256 bits), base64")
    return key


def local_key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def default_backend() -> Backend:
    from deepgate.secrets import vault

    return "transit" if vault.configured() else "local"


def transit_key_name() -> str:
    return os.environ.get(TRANSIT_KEY_ENV) or DEFAULT_TRANSIT_KEY


# ---------------------------------------------------------------------------------------------
# Seal, open, reseal


def _encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


def _new_data_key(backend: Backend, key_name: str | None) -> tuple[str, bytes, bytes]:
    """(key id, plaintext data key, wrapped data key)."""
    if backend == "transit":
        from deepgate.secrets import vault

        name = key_name or transit_key_name()
        if not _NAME.match(name):
            raise SecretError(f"transit key name {name!r}: use letters, digits, '-' and '_'")
        plain, wrapped = vault.data_key(name)
        return name, plain, wrapped.encode("ascii")
    kek = local_key()
    key_id = local_key_id(kek)
    plain = AESGCM.generate_key(bit_length=256)
    aad = f"{VERSION}.local.{key_id}".encode()
    return key_id, plain, _encrypt(kek, plain, aad)


def seal(value: str, backend: Backend | None = None, key_name: str | None = None) -> Token:
    """Seal ``value`` under a new data key; ``backend`` None: transit if VAULT_ADDR is set."""
    backend = backend or default_backend()
    key_id, data_key, wrapped = _new_data_key(backend, key_name)
    aad = f"{VERSION}.{backend}.{key_id}".encode()
    return Token(backend, key_id, wrapped, _encrypt(data_key, value.encode("utf-8"), aad))


def _unwrap(token: Token, ref: str) -> bytes:
    if token.backend == "transit":
        from deepgate.secrets import vault

        try:
            return vault.unwrap(token.key_id, token.wrapped.decode("ascii"))
        except SecretError as exc:
            raise SecretError(f"{_name(ref)}: cannot unwrap the data key: {exc}") from None
    kek = local_key()
    if local_key_id(kek) != token.key_id:
        raise SecretError(
            f"{_name(ref)}: sealed with local key {token.key_id}, but the configured key is "
            f"{local_key_id(kek)}; set {KEY_FILE_ENV} to the key that sealed it"
        )
    try:
        return _decrypt(kek, token.wrapped, token.aad)
    except (InvalidTag, ValueError):
        raise SecretError(f"{_name(ref)}: the wrapped data key does not open (damaged)") from None


def open_token(text: str, ref: str) -> str:
    """The value sealed in ``text`` (a token, with or without ``$sealed://``)."""
    token = parse(text, ref)
    data_key = _unwrap(token, ref)
    try:
        return _decrypt(data_key, token.payload, token.aad).decode("utf-8")
    except (InvalidTag, ValueError, UnicodeDecodeError):
        raise SecretError(f"{_name(ref)}: the sealed value does not open (damaged)") from None


def reseal(
    text: str, new_value: str | None = None, rotate_key: bool = False, ref: str = "sealed value"
) -> Token:
    """Rotate a sealed value.

    With ``new_value``: seal the new value (e.g. a rotated provider key) with the token's
    backend and key. Without: transit tokens are rewrapped under the key's latest version (after
    rotating the transit key when ``rotate_key``), with no plaintext leaving Vault; local tokens
    get a new data key.
    """
    token = parse(text, ref)
    if token.backend == "transit":
        from deepgate.secrets import vault

        if rotate_key:
            vault.rotate_key(token.key_id)
        if new_value is None:
            wrapped = vault.rewrap(token.key_id, token.wrapped.decode("ascii"))
            return Token("transit", token.key_id, wrapped.encode("ascii"), token.payload)
        return seal(new_value, "transit", token.key_id)
    if rotate_key:
        raise SecretError(
            "a local sealing key is rotated by sealing again under a new key file: open with the "
            f"old {KEY_FILE_ENV}, then seal with the new one (see docs/secrets.md)"
        )
    value = new_value if new_value is not None else open_token(text, ref)
    return seal(value, "local")
