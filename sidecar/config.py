"""The sidecar's configuration: providers, model aliases, deadlines, retries and breakers.

The shipped default is ``sidecar/default.yaml``; ``--config FILE`` replaces it. Keys are secret
references (``$env://NAME``, ``$file://``, ``$vault://``, ``$sealed://``; docs/secrets.md), never
values: a provider whose key is unset is simply not available, and chains skip it (the start-up
log says which). Keys in files, Vault or sealed are re-read after the secret TTL (rotation).
Base URLs come from the usual variables (``DEEPSEEK_BASE_URL``, ``OPENAI_BASE_URL``,
``ANTHROPIC_BASE_URL``) when set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from deepgate.config import ConfigError, StrictModel, is_secret_ref, load_model, resolve_secret
from deepgate.secrets import SecretRef

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

ProviderKind = Literal["openai_compat", "anthropic", "local"]


class ProviderConfig(StrictModel):
    kind: ProviderKind
    api_key: str | None = None  # a secret reference, e.g. $env://DEEPSEEK_API_KEY
    base_url: str | None = None
    base_url_env: str | None = None  # a variable that overrides base_url when set
    region: str = "global"

    @field_validator("api_key")
    @classmethod
    def _key_is_a_reference(cls, value: str | None) -> str | None:
        if value is not None and not is_secret_ref(value):
            raise ValueError("api_key must be a secret reference such as $env://OPENAI_API_KEY")
        return value

    def resolved_key(self) -> str | None:
        """The key, or ``None`` when it cannot be resolved or is empty (provider unavailable)."""
        if self.api_key is None:
            return None
        try:
            return resolve_secret(self.api_key) or None
        except ConfigError as exc:  # names the reference, never a value
            if not self.api_key.startswith("$env://"):  # an unset variable: the caller says so
                logging.getLogger(__name__).warning("provider key unavailable: %s", exc)
            return None

    def rotating_key(self) -> SecretRef | None:
        """The key re-read on use (after the secret TTL), for keys in files, Vault or sealed.

        ``$env://`` keys cannot change while the process runs: None, the adapter keeps its key.
        """
        if self.api_key is None or self.api_key.startswith("$env://"):
            return None
        return SecretRef(self.api_key)

    def resolved_base_url(self) -> str | None:
        if self.base_url_env and os.environ.get(self.base_url_env):
            return os.environ[self.base_url_env]
        return self.base_url


class Target(StrictModel):
    """One (provider, model) a chain may call."""

    provider: str
    model: str

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.model}"

    @classmethod
    def parse(cls, text: str) -> Target:
        provider, sep, model = text.partition(":")
        if not sep or not provider or not model:
            raise ValueError(f"a target is written provider:model (got {text!r})")
        return cls(provider=provider, model=model)


class Deadlines(StrictModel):
    connect_s: float = Field(default=5.0, gt=0)
    first_token_s: float = Field(default=60.0, gt=0)
    total_s: float = Field(default=600.0, gt=0)


class Retries(StrictModel):
    attempts: int = Field(default=2, ge=1, le=10)  # tries per target, the first included
    backoff_base_s: float = Field(default=0.2, ge=0)
    backoff_max_s: float = Field(default=4.0, ge=0)
    # A Retry-After longer than this is not waited for: the next target is tried instead.
    max_wait_s: float = Field(default=2.0, ge=0)


class Breaker(StrictModel):
    consecutive_failures: int = Field(default=5, ge=1)
    error_rate: float = Field(default=0.5, gt=0, le=1)
    min_calls: int = Field(default=20, ge=1)  # calls in the window before the rate counts
    window_s: float = Field(default=30.0, gt=0)
    open_s: float = Field(default=15.0, gt=0)  # how long an open breaker refuses calls
    half_open_probes: int = Field(default=1, ge=1)


class PoolConfig(StrictModel):
    """The inference pool: models run in this process (roles pool, all) or replicas to call."""

    addresses: list[str] = Field(default_factory=list)  # gateway role: pool replicas, host:port
    embedding_model: str = "all-MiniLM-L6-v2"
    classifier_model: str = "deepgate-safety"
    local_chat: bool = True  # serve the local chat model (provider "local") in this process
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_queue: int = Field(default=1024, ge=1)
    workers: int = Field(default=1, ge=1)
    torch_threads: int = Field(default=1, ge=1)  # leave cores for the event loop
    # float32, or bfloat16 where the device computes it natively (auto: GPUs, AMX/AVX-512 BF16)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class SidecarConfig(StrictModel):
    providers: dict[str, ProviderConfig]
    aliases: dict[str, list[str]]
    embedding_models: list[str] = Field(default_factory=list)
    deadlines: Deadlines = Field(default_factory=Deadlines)
    retries: Retries = Field(default_factory=Retries)
    breaker: Breaker = Field(default_factory=Breaker)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    expose_provider_errors: bool = False  # pass a provider's own error text to clients
    shutdown_grace_s: float = Field(default=10.0, ge=0)

    @model_validator(mode="after")
    def _chains_name_known_providers(self) -> SidecarConfig:
        for alias, chain in self.aliases.items():
            if not chain:
                raise ValueError(f"aliases.{alias}: a chain needs at least one target")
            for i, text in enumerate(chain):
                try:
                    target = Target.parse(text)
                except ValueError as exc:
                    raise ValueError(f"aliases.{alias}[{i}]: {exc}") from None
                if target.provider not in self.providers:
                    raise ValueError(
                        f"aliases.{alias}[{i}]: unknown provider {target.provider!r}; "
                        f"add it under providers or fix the name"
                    )
        return self

    def chain(self, alias: str) -> list[Target]:
        return [Target.parse(t) for t in self.aliases[alias]]


def load_config(path: str | Path | None = None) -> SidecarConfig:
    """Load and validate a sidecar config (the shipped default when ``path`` is None)."""
    return load_model(path or DEFAULT_CONFIG, SidecarConfig)
