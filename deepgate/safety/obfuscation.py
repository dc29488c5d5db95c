"""Obfuscation: text written so that a reader, a regex or a filter sees something else.

Three tricks, each a finding of its own:

- ``invisible_characters``: zero-width characters, bidi controls, Unicode tag characters (which
  can carry a whole hidden ASCII message); a run of them is one finding;
- ``mixed_script``: a word that mixes Latin letters with Cyrillic or Greek look-alikes
  ("password" written with a Cyrillic "a"), the classic way past a word filter;
- ``encoded_text``: a base64 or hex blob that decodes to readable text. The decoded text is also
  handed to the other detectors; what they find there is reported under their own name and
  action, spanning the blob (so "aWdub3Jl..." carrying an injection is blocked as an injection).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from deepgate.safety.base import Action, Detector, Finding, Scope

NAME = "obfuscation"

_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f"
    "\U000e0100-\U000e01ef]+"
)
_LATIN = "A-Za-z\u00c0-\u024f"
_LOOKALIKE = "\u0370-\u03ff\u0400-\u04ff"  # Greek and Cyrillic
_MIXED_WORD = re.compile(
    rf"[{_LATIN}{_LOOKALIKE}]*(?:[{_LATIN}][{_LATIN}{_LOOKALIKE}]*[{_LOOKALIKE}]"
    rf"|[{_LOOKALIKE}][{_LATIN}{_LOOKALIKE}]*[{_LATIN}])[{_LATIN}{_LOOKALIKE}]*"
)


def _encoded_pattern(min_chars: int) -> re.Pattern[str]:
    """Base64 (standard or URL-safe, padded or not) and hex runs of at least ``min_chars``."""
    return re.compile(
        rf"(?<![A-Za-z0-9+/_=-])(?:[A-Za-z0-9+/_-]{{{min_chars},}}={{0,2}}"
        rf"|(?:[0-9A-Fa-f]{{2}}){{{(min_chars + 1) // 2},}})(?![A-Za-z0-9+/_=-])"
    )


def _readable(data: bytes) -> str | None:
    """``data`` as text when it is UTF-8 that is mostly printable words, else ``None``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    printable = sum(1 for c in text if c.isprintable() or c in "\n\r\t")
    letters = sum(1 for c in text if c.isalpha() or c == " ")
    if printable < 0.95 * len(text) or letters < 0.6 * len(text):
        return None
    return text


def decode_blob(blob: str) -> str | None:
    """The readable text a base64 or hex blob stands for, or ``None``."""
    if len(blob) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in blob):
        try:
            return _readable(binascii.unhexlify(blob))
        except binascii.Error:
            return None
    core = blob.rstrip("=")
    padded = core + "=" * (-len(core) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None
    return _readable(raw)


@dataclass(frozen=True, slots=True)
class ObfuscationDetector:
    action: Action
    scope: Scope
    invisible: bool = True
    homoglyphs: bool = True
    min_encoded_chars: int = 24  # 0: blobs are not decoded
    inner: Sequence[Detector] = ()  # the detectors that read decoded blobs
    name: str = NAME
    _encoded: re.Pattern[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.min_encoded_chars:
            object.__setattr__(self, "_encoded", _encoded_pattern(self.min_encoded_chars))

    @property
    def slow(self) -> bool:
        return any(d.slow for d in self.inner)

    def scan(self, text: str) -> list[Finding]:
        out: list[Finding] = []
        if not text.isascii():  # both character tricks need non-ASCII characters
            if self.invisible:
                out.extend(
                    Finding(self.name, "invisible_characters", m.start(), m.end(), 1.0)
                    for m in _INVISIBLE.finditer(text)
                )
            if self.homoglyphs:
                out.extend(
                    Finding(self.name, "mixed_script", m.start(), m.end(), 1.0)
                    for m in _MIXED_WORD.finditer(text)
                )
        # A blob is one run without whitespace: no word that long, no blob (~5 µs vs ~10).
        longest = max(map(len, text.split()), default=0)
        if self._encoded is not None and longest >= self.min_encoded_chars:
            for m in self._encoded.finditer(text):
                decoded = decode_blob(m.group())
                if decoded is None:
                    continue
                out.append(Finding(self.name, "encoded_text", m.start(), m.end(), 1.0))
                for detector in self.inner:
                    for f in detector.scan(decoded):
                        out.append(Finding(f.detector, f.label, m.start(), m.end(), f.score))
        return out
