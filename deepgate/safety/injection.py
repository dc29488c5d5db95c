"""Prompt injection and jailbreak rules: families of phrasings, matched in one pass.

The rules catch the well-worn openings (override the instructions, reveal the system prompt,
role-play an unrestricted model, developer mode, DAN) in English and German, written with the
usual slack: any of several verbs, optional words in between, punctuation and case ignored. Each
family has a score; a finding is reported when its score reaches the detector's threshold. The
pool's classifier is the second half of this detector and runs in the plugin (it needs the
sidecar); both report as detector ``injection``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deepgate.safety.base import Action, Finding, Literals, Scope

NAME = "injection"

_W = r"(?:\W+\w+){0,3}?\W+"  # up to three filler words between the parts of a phrase
_PRIOR = (
    r"(?:previous|prior|preceding|above|earlier|former|initial|original|system|your|all|any|the)"
)
_RULES_NOUN = (
    r"(?:instructions?|prompts?|rules|guidelines|directions|directives|commands|constraints"
    r"|context|programming|guardrails|restrictions|polic(?:y|ies)|orders|assignments)"
)

# family -> (score, pattern). Scores: 1.0 is an unambiguous attack phrase; 0.7 is a phrasing
# that also has innocent uses (the default threshold 0.8 leaves those to the classifier).
FAMILIES: dict[str, tuple[float, str]] = {
    "override_instructions": (
        1.0,
        rf"\b(?:ignore|disregard|forget|override|bypass|skip|drop|abandon|neglect)"
        rf"(?:\W+\w+){{0,3}}?\W+{_PRIOR}{_W}?{_RULES_NOUN}\b",
    ),
    "forget_everything": (
        1.0,
        r"\b(?:forget|disregard|ignore)\W+(?:about\W+)?(?:everything|all(?:\W+of\W+it)?|what)"
        r"(?:\W+\w+){0,4}?\W+(?:above|before|so\W+far|previously|prior|you\W+(?:were|have\W+been)"
        r"\W+(?:told|given)|(?:we|I)\W+(?:have\W+|'ve\W+)?(?:talked|said|discussed))\b",
    ),
    "reveal_system_prompt": (
        1.0,
        r"\b(?:print|reveal|show|repeat|output|display|tell|give|leak|dump|write\W+out|recite)"
        r"(?:\W+\w+){0,4}?\W+(?:system|hidden|secret|initial|original|developer)\W+"
        r"(?:prompt|instructions?|message|rules)\b"
        r"|\bwhat\W+(?:are|were)\W+your\W+(?:original\W+|initial\W+|hidden\W+)?instructions\b",
    ),
    "unrestricted_persona": (
        1.0,
        r"\b(?:you\W+are\W+(?:now\W+)?|act\W+as\W+|pretend\W+(?:to\W+be|you\W+are)\W+|"
        r"roleplay\W+as\W+|from\W+now\W+on\W+you\W+are\W+)(?:an?\W+)?(?:DAN|unrestricted|unfiltered"
        r"|uncensored|jailbroken|evil)\b",
    ),
    "do_anything_now": (1.0, r"\bdo\W+anything\W+now\b|\bDAN\W+mode\b"),
    "developer_mode": (
        1.0,
        r"\b(?:enable|activate|enter|switch\W+to)\W+(?:\w+\W+)?(?:developer|debug|god|jailbreak)"
        r"\W+mode\b",
    ),
    "no_restrictions": (
        0.7,
        r"\b(?:without|no|free\W+of|free\W+from)\W+(?:any\W+)?(?:restrictions|filters|limitations"
        r"|censorship|guidelines|safety\W+rules)\b",
    ),
    "new_instructions": (
        0.7,
        r"\b(?:new|updated|real|actual)\W+(?:instructions|task|orders)\W*:"
        r"|\bnow\W+(?:\w+\W+){0,2}?new\W+tasks?\b",
    ),
    "instructions_are_now": (
        1.0,
        r"\byour\W+(?:new\W+)?instructions\W+are\W+now\b",
    ),
    "german_override": (
        1.0,
        r"\b(?:vergiss|vergessen\W+sie|ignorier\w*|missacht\w*|übergeh\w*)\W+(?:\w+\W+){0,3}?"
        r"(?:anweisungen|regeln|vorgaben|instruktionen|befehle)\b"
        r"|\b(?:vergiss|vergessen\W+sie)\W+alles\W+(?:davor|zuvor|bisher|vorher|gesagte|was)\b",
    ),
    "other_language_override": (
        1.0,
        r"(?:забудь(?:те)?|игнорируй(?:те)?)\W+(?:\w+\W+){0,3}?(?:инструкции|указания|правила)"
        r"|\b(?:olvid[ae]|ignor[ae])\W+(?:\w+\W+){0,3}?(?:instrucciones|reglas|lo\W+anterior"
        r"|todo\W+(?:lo\W+)?que\W+(?:te\W+)?(?:dije|digo))\b"
        r"|\b(?:oublie[zs]?|ignorez)\W+(?:\w+\W+){0,3}?(?:instructions|consignes|règles)\b",
    ),
}


# family -> words (lower case) of which the text must hold one before the family's regex runs:
# each regex needs one of them, and a substring test is far cheaper than the regex on prose.
ANCHORS: dict[str, tuple[str, ...]] = {
    "override_instructions": (
        "instruction", "prompt", "rule", "guideline", "direct", "command", "constraint",
        "context", "programming", "guardrail", "restriction", "polic", "order", "assignment",
    ),
    "forget_everything": ("forget", "disregard", "ignore"),
    "instructions_are_now": ("instructions",),
    "other_language_override": (
        "инструкц", "указани", "правил", "instrucciones", "reglas", "anterior", "dije", "digo",
        "instructions", "consignes", "règles",
    ),
    "reveal_system_prompt": ("prompt", "instruction", "message", "rule"),
    "unrestricted_persona": (
        "dan", "unrestricted", "unfiltered", "uncensored", "jailbroken", "evil",
    ),
    "do_anything_now": ("anything", "dan"),
    "developer_mode": ("mode",),
    "no_restrictions": ("restriction", "filter", "limitation", "censorship", "guideline", "safety"),
    "new_instructions": ("instruction", "task", "order"),
    "german_override": (
        "anweisung", "regel", "vorgabe", "instruktion", "befehl", "davor", "zuvor", "bisher",
        "vorher", "gesagte", "was",
    ),
}  # fmt: skip

# family -> a second list of words the family's regex also needs (every alternative of it): the
# verb of an override ("ignore ... instructions"). Nouns like "order" or "context" fill ordinary
# prose; with the verb required too, the regex runs only on text that holds both.
ALSO_NEEDS: dict[str, tuple[str, ...]] = {
    "override_instructions": (
        "ignore", "disregard", "forget", "override", "bypass", "skip", "drop", "abandon", "neglect",
    ),
    "new_instructions": ("new", "updated", "real", "actual"),
    "german_override": ("vergiss", "vergessen", "ignorier", "missacht", "übergeh"),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class InjectionRules:
    """The rule families at or above ``threshold``, plus the route's own extra phrases."""

    action: Action
    scope: Scope
    # (family, score, anchors, words it also needs (may be empty), pattern)
    families: tuple[tuple[str, float, tuple[str, ...], tuple[str, ...], re.Pattern[str]], ...]
    anchors: Literals  # every family's anchors, found in one pass
    extra: tuple[tuple[str, re.Pattern[str]], ...] = ()  # the route's phrases, scored 1.0
    name: str = NAME
    slow: bool = False

    @classmethod
    def build(
        cls,
        threshold: float | None,
        action: Action,
        scope: Scope,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> InjectionRules:
        """``extra``: (name, regex) phrases of the route's own, each compiled alone (they may
        carry their own flags); ``threshold`` None leaves the built-in families out."""
        families = tuple(
            (
                family,
                score,
                ANCHORS[family],
                ALSO_NEEDS.get(family, ()),
                re.compile(source, re.IGNORECASE),
            )
            for family, (score, source) in FAMILIES.items()
            if threshold is not None and score >= threshold
        )
        phrases = tuple((name, re.compile(src)) for name, src in extra)
        anchors = Literals(a for _, _, one, two, _ in families for a in (*one, *two))
        return cls(action, scope, families, anchors, phrases)

    def scan(self, text: str) -> list[Finding]:
        out: list[Finding] = []
        if self.families:
            present = self.anchors.found(text.lower())
            for family, score, anchors, also, pattern in self.families:
                if not present.isdisjoint(anchors) and not (also and present.isdisjoint(also)):
                    out.extend(
                        Finding(self.name, family, m.start(), m.end(), score)
                        for m in pattern.finditer(text)
                    )
        for name, phrase in self.extra:
            out.extend(
                Finding(self.name, name, m.start(), m.end(), 1.0) for m in phrase.finditer(text)
            )
        return out
