"""The safety detectors' configuration: plain JSON, one optional block per detector.

The same models configure the prompt side (the ``deepgate-safety`` plugin) and the answer side:
the plugin sends the ``output`` block to the sidecar in ``ctx.facts["safety_output"]`` as JSON,
and the sidecar rebuilds the detectors with ``build_detectors``. A detector that is absent is off.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from deepgate.config import StrictModel
from deepgate.safety import credentials, personal_data
from deepgate.safety.base import Action, History, Scope

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class DetectorConfig(StrictModel):
    """What every detector has: an action, a threshold and a scope."""

    action: Action = "block"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    roles: list[Role] = Field(default=["user"], min_length=1)
    history: History = "last"

    @model_validator(mode="after")
    def _no_mask(self) -> DetectorConfig:
        if self.action == "mask" and not isinstance(self, PersonalDataConfig):
            raise ValueError(
                "action 'mask' is for personal_data only (its placeholders are put back in the "
                "answer); use 'redact' or 'block'"
            )
        return self

    def scope(self) -> Scope:
        return Scope(tuple(self.roles), self.history)


class ObfuscationConfig(DetectorConfig):
    """Hidden characters, mixed-script words, and encoded blobs (decoded and scanned)."""

    action: Action = "log"
    invisible: bool = True
    homoglyphs: bool = True
    decode: bool = True
    min_encoded_chars: int = Field(default=24, ge=8)


class ExtraPhrase(StrictModel):
    name: str = Field(min_length=1)
    pattern: str


class ClassifierConfig(StrictModel):
    """The pool's classifier (``deepgate-safety`` model): runs in the plugin, over gRPC."""

    threshold: float = Field(default=0.95, ge=0.0, le=1.0)
    unsafe_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    timeout_ms: int = Field(default=300, gt=0, le=10_000)
    on_error: Literal["open", "closed"] = "open"
    model: str = "deepgate-safety"


class InjectionConfig(DetectorConfig):
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    rules: bool = True
    phrases: list[ExtraPhrase] = Field(default_factory=list)
    classifier: ClassifierConfig | None = None

    @field_validator("phrases")
    @classmethod
    def _phrases_compile(cls, phrases: list[ExtraPhrase]) -> list[ExtraPhrase]:
        import re

        for i, p in enumerate(phrases):
            try:
                re.compile(p.pattern)
            except re.error as exc:
                raise ValueError(f"phrases[{i}] is not a valid regular expression: {exc}") from None
        return phrases


PersonalEntity = Literal[
    "CREDIT_CARD", "IBAN_CODE", "US_SSN", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS",
    "CRYPTO", "US_ITIN", "UK_NHS", "PERSON", "LOCATION", "NRP", "DATE_TIME",
]  # fmt: skip


DEFAULT_ENTITIES: tuple[PersonalEntity, ...] = personal_data.DEFAULT_ENTITIES  # type: ignore[assignment]


class PersonalDataConfig(DetectorConfig):
    action: Action = "redact"
    threshold: float = Field(default=0.4, ge=0.0, le=1.0)
    entities: list[PersonalEntity] = Field(default=list(DEFAULT_ENTITIES), min_length=1)
    # ISO 3166 codes whose national phone formats count; absent: Presidio's eight
    phone_regions: list[Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]] | None = Field(
        default=None, min_length=1
    )


SecretKind = Literal[
    "artifactory_token", "aws_key", "azure_storage_key", "basic_auth_url",
    "cloudant_credentials", "discord_bot_token", "github_token", "gitlab_token",
    "ibm_cloud_iam_key", "ibm_cos_hmac_key", "jwt", "mailchimp_key", "npm_token", "openai_key",
    "private_key", "pypi_token", "sendgrid_key", "slack_token", "softlayer_credentials",
    "square_oauth_secret", "stripe_key", "telegram_bot_token", "twilio_key", "secret_keyword",
]  # fmt: skip


DEFAULT_KINDS: tuple[SecretKind, ...] = credentials.DEFAULT_KINDS  # type: ignore[assignment]


class SecretsConfig(DetectorConfig):
    kinds: list[SecretKind] = Field(default=list(DEFAULT_KINDS), min_length=1)


class DetectorsConfig(StrictModel):
    """The detectors ``build_detectors`` makes; each block present turns its detector on."""

    obfuscation: ObfuscationConfig | None = None
    injection: InjectionConfig | None = None
    personal_data: PersonalDataConfig | None = None
    secrets: SecretsConfig | None = None
