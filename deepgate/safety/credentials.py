"""Secrets in text: detect-secrets' named detectors (cloud keys, tokens, private keys, ...).

Only detectors that recognise a credential by its shape are offered. The entropy detectors flag
ordinary long words and identifiers in prose, the keyword detector flags any "password = ..."
sentence, and the public-IP detector is personal data's business, so none of them is on by
default (the keyword detector may be named explicitly). A finding spans the secret itself, so a
redaction removes the key and keeps the sentence around it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from deepgate.safety.base import Action, Finding, Literals, Scope

NAME = "secrets"

# detect-secrets plugin class -> our label (stable, lower-case, what findings and docs say).
LABELS: dict[str, str] = {
    "ArtifactoryDetector": "artifactory_token",
    "AWSKeyDetector": "aws_key",
    "AzureStorageKeyDetector": "azure_storage_key",
    "BasicAuthDetector": "basic_auth_url",
    "CloudantDetector": "cloudant_credentials",
    "DiscordBotTokenDetector": "discord_bot_token",
    "GitHubTokenDetector": "github_token",
    "GitLabTokenDetector": "gitlab_token",
    "IbmCloudIamDetector": "ibm_cloud_iam_key",
    "IbmCosHmacDetector": "ibm_cos_hmac_key",
    "JwtTokenDetector": "jwt",
    "MailchimpDetector": "mailchimp_key",
    "NpmDetector": "npm_token",
    "OpenAIDetector": "openai_key",
    "PrivateKeyDetector": "private_key",
    "PypiTokenDetector": "pypi_token",
    "SendGridDetector": "sendgrid_key",
    "SlackDetector": "slack_token",
    "SoftlayerDetector": "softlayer_credentials",
    "SquareOAuthDetector": "square_oauth_secret",
    "StripeDetector": "stripe_key",
    "TelegramBotTokenDetector": "telegram_bot_token",
    "TwilioKeyDetector": "twilio_key",
    "KeywordDetector": "secret_keyword",
}
# Each detector runs only when the text holds a substring that every one of its regexes needs
# (read off detect-secrets' patterns): one pass finds every gate's literals (``Literals``), where
# a regex pass over a prompt costs microseconds, and the assignment-style regexes (a keyword, a
# separator, then a long secret, tried at every position) tens of them. The AWS, Slack and
# assignment-style regexes ignore case.
_KEYWORDS = ("key", "pw", "pass", "token")
GATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # label: (needed in the lower-cased text, needed in the text as written): any one will do
    "artifactory_token": ((), ("AKC", "AP")),
    "aws_key": (("aws",), ("A3T", "ABIA", "ACCA", "AKIA", "ASIA")),
    "azure_storage_key": ((), ("AccountKey=",)),
    "basic_auth_url": ((), ("://",)),
    "cloudant_credentials": ((*_KEYWORDS, "cloudant"), ()),
    "github_token": ((), ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    "gitlab_token": ((), ("gl", "GR1348941")),
    "ibm_cloud_iam_key": (_KEYWORDS, ()),
    "ibm_cos_hmac_key": (("key",), ()),
    "jwt": ((), ("eyJ",)),
    "mailchimp_key": ((), ("-us",)),
    "npm_token": ((), (":_authToken=",)),
    "openai_key": ((), ("T3BlbkFJ",)),
    "private_key": ((), ("PRIVATE KEY", "PuTTY-User-Key-File-2")),
    "pypi_token": ((), ("pypi-",)),
    "sendgrid_key": ((), ("SG.",)),
    "slack_token": (("xox", "hooks.slack.com"), ()),
    "softlayer_credentials": ((*_KEYWORDS, "softlayer"), ()),
    "square_oauth_secret": ((), ("sq0csp-",)),
    "stripe_key": ((), ("k_live_",)),
    "telegram_bot_token": ((), (":",)),
    "twilio_key": ((), ("AC", "SK")),
}  # discord_bot_token has no literal of its own: it always runs
OFF_BY_DEFAULT = frozenset({"secret_keyword"})
DEFAULT_KINDS: tuple[str, ...] = tuple(v for v in LABELS.values() if v not in OFF_BY_DEFAULT)


@functools.cache
def _plugin_classes() -> dict[str, Any]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    mapping: dict[str, Any] = get_mapping_from_secret_type_to_class()
    return {plugin.__name__: plugin for plugin in mapping.values()}


@dataclass(frozen=True, slots=True)
class SecretsDetector:
    """detect-secrets' named detectors, each one's matches located in the text."""

    action: Action
    scope: Scope
    plugins: tuple[tuple[str, Any], ...]  # (label, detect-secrets plugin instance)
    lowered: Literals  # every gate's lower-case literals, found in one pass
    written: Literals  # every gate's literals as written
    ungated: frozenset[str]  # labels that always run
    opens: dict[tuple[bool, str], frozenset[str]]  # (lower-case?, literal) -> labels it lets run
    name: str = NAME
    slow: bool = False

    @classmethod
    def build(cls, kinds: tuple[str, ...], action: Action, scope: Scope) -> SecretsDetector:
        classes = _plugin_classes()
        by_label = {label: classes[name] for name, label in LABELS.items() if name in classes}
        plugins = tuple((k, by_label[k]()) for k in kinds if k in by_label)
        opens: dict[tuple[bool, str], set[str]] = {}
        for label, _ in plugins:
            lower_words, written_words = GATES.get(label, ((), ()))
            for word in lower_words:
                opens.setdefault((True, word), set()).add(label)
            for word in written_words:
                opens.setdefault((False, word), set()).add(label)
        return cls(
            action,
            scope,
            plugins,
            Literals(w for lower, w in opens if lower),
            Literals(w for lower, w in opens if not lower),
            frozenset(label for label, _ in plugins if label not in GATES),
            {key: frozenset(labels) for key, labels in opens.items()},
        )

    def scan(self, text: str) -> list[Finding]:
        out: list[Finding] = []
        run = set(self.ungated)
        for word in self.lowered.found(text.lower()):
            run |= self.opens[(True, word)]
        for word in self.written.found(text):
            run |= self.opens[(False, word)]
        for label, plugin in self.plugins:
            if label not in run:
                continue
            # The plugin's own matching (with its validations, e.g. a JWT must decode) decides;
            # its regexes give the spans: what it yields may be only a capture group.
            secrets = [s for s in plugin.analyze_string(text) if s]
            if not secrets:
                continue
            for start, end in _spans(text, plugin, secrets):
                if label == "private_key":  # the header matched: take the whole PEM block
                    start = start - 5 if text[max(0, start - 5) : start] == "-----" else start
                    end = _pem_end(text, start)
                out.append(Finding(self.name, label, start, end, 1.0))
        return out


def _spans(text: str, plugin: Any, secrets: list[str]) -> list[tuple[int, int]]:
    spans = [
        m.span()
        for regex in getattr(plugin, "denylist", ())
        for m in regex.finditer(text)
        if any(secret in m.group(0) for secret in secrets)
    ]
    if spans:
        return spans
    for secret in secrets:  # a plugin without regexes of its own: locate what it found
        start = text.find(secret)
        while start >= 0:
            spans.append((start, start + len(secret)))
            start = text.find(secret, start + len(secret))
    return spans


_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")


def _pem_end(text: str, start: int) -> int:
    """Where a private key that starts at ``start`` ends (the text's end when it is cut off)."""
    match = _PEM_END.search(text, start)
    return match.end() if match else len(text)


def available_kinds() -> tuple[str, ...]:
    """Every label the installed detect-secrets can detect."""
    classes = _plugin_classes()
    return tuple(label for name, label in LABELS.items() if name in classes)
