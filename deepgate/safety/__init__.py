"""Safety detectors shared by the plugin runner (prompts) and the sidecar (answers).

- ``Finding(detector, label, start, end, score)``: what a detector saw, and where;
- ``Detector``: ``name``, ``action``, ``scope``, ``slow`` and ``scan(text) -> list[Finding]``;
- ``build_detectors(config)`` from plain JSON (``DetectorsConfig``): obfuscation, injection rules,
  personal data (Presidio, spaCy), secrets (detect-secrets);
- ``redact(text, findings)`` and ``Masker`` (reversible placeholders) / ``unmask``.

Nothing here talks to the network or imports torch: the detectors that need a model served by
the pool (the injection classifier, banned topics) live in the plugin, which has the gRPC link.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepgate.safety.base import (
    Action,
    Detector,
    Finding,
    Masker,
    Scope,
    merge_spans,
    redact,
    redaction_label,
    unmask,
)
from deepgate.safety.config import DetectorsConfig
from deepgate.safety.credentials import SecretsDetector
from deepgate.safety.injection import InjectionRules
from deepgate.safety.obfuscation import ObfuscationDetector
from deepgate.safety.personal_data import PersonalDataDetector

__all__ = [
    "Action",
    "Detector",
    "DetectorsConfig",
    "Finding",
    "Masker",
    "Scope",
    "build_detectors",
    "merge_spans",
    "redact",
    "redaction_label",
    "unmask",
]


def build_detectors(config: DetectorsConfig | Mapping[str, Any]) -> list[Detector]:
    """The configured detectors, in the order they should run (cheap and decisive first).

    Loads what they need (Presidio, spaCy, detect-secrets) now: call it when a config is
    prepared, not per request. Obfuscation comes last: it decodes blobs and hands the decoded
    text to the detectors before it.
    """
    conf = config if isinstance(config, DetectorsConfig) else DetectorsConfig.model_validate(config)
    out: list[Detector] = []
    if conf.injection is not None and (conf.injection.rules or conf.injection.phrases):
        inj = conf.injection
        phrases = tuple((p.name, p.pattern) for p in inj.phrases)
        threshold = inj.threshold if inj.rules else None
        out.append(InjectionRules.build(threshold, inj.action, inj.scope(), phrases))
    if conf.secrets is not None:
        s = conf.secrets
        out.append(SecretsDetector.build(tuple(s.kinds), s.action, s.scope()))
    if conf.personal_data is not None:
        p = conf.personal_data
        regions = tuple(p.phone_regions) if p.phone_regions else None
        out.append(
            PersonalDataDetector.build(
                tuple(p.entities), p.threshold, p.action, p.scope(), phone_regions=regions
            )
        )
    if conf.obfuscation is not None:
        o = conf.obfuscation
        out.append(
            ObfuscationDetector(
                action=o.action,
                scope=o.scope(),
                invisible=o.invisible,
                homoglyphs=o.homoglyphs,
                min_encoded_chars=o.min_encoded_chars if o.decode else 0,
                inner=tuple(out),
            )
        )
    return out
