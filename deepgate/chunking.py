"""Cutting text and Markdown files into chunks for RAG: the unit that is embedded, retrieved
and quoted to the model.

Sizes are in **tokens** of ``o200k_base`` (counted with ``toktok``, as the prompt filter counts
prompts), so a route's context budget and the chunk size speak the same unit. The defaults (200
tokens, 40 of overlap) keep each chunk inside what the embedding model reads (all-MiniLM-L6-v2
stops at 256 word pieces, about 200 such tokens of English prose).

Markdown is cut at its headings first: a chunk never spans two sections, and each carries its
heading path ("Install > Linux") so a citation can say where it came from. Inside a section,
paragraphs are packed together up to the size; a paragraph too long for one chunk is cut at
sentence ends, and a sentence too long at word boundaries. Fenced code blocks are kept whole
where they fit and otherwise cut between lines (line breaks and indentation kept); a ``#`` line
inside one is not a heading. Consecutive chunks of a section
share their last/first ``overlap`` tokens (whole sentences or paragraphs), so a fact that
straddles a cut is still found.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import toktok

ENCODING = "o200k_base"
DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 40

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?…。])\s+")


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int  # position in the file, from 0
    text: str
    heading: str  # "Title > Section > Subsection", or "" before any heading / in plain text
    tokens: int


def count_tokens(text: str) -> int:
    return int(toktok.batch_count([text], ENCODING, threads=1)[0])


@dataclass(frozen=True, slots=True)
class _Unit:
    text: str
    joiner: str  # what goes before it when it follows another unit in a chunk


def _sections(text: str, markdown: bool) -> list[tuple[str, str]]:
    """(heading path, body) pairs in file order."""
    if not markdown:
        return [("", text)]
    sections: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []
    in_fence = False
    heading = ""
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match is None:
            body.append(line)
            continue
        sections.append((heading, "\n".join(body)))
        body = []
        level = len(match.group(1))
        path = [(lvl, title) for lvl, title in path if lvl < level]
        path.append((level, match.group(2).strip()))
        heading = " > ".join(title for _, title in path)
    sections.append((heading, "\n".join(body)))
    return [(h, b) for h, b in sections if b.strip()]


def _paragraphs(body: str) -> list[str]:
    """Blank-line separated blocks; a fenced code block is one block, blank lines and all."""
    blocks: list[str] = []
    current: list[str] = []
    in_fence = False
    for line in body.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return [b.strip("\n") for b in blocks if b.strip()]


def _split_words(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    for word in text.split():
        if current and count(" ".join([*current, word])) > max_tokens:
            pieces.append(" ".join(current))
            current = []
        current.append(word)
    if current:
        pieces.append(" ".join(current))
    return pieces


def _units(body: str, max_tokens: int, count: Callable[[str], int]) -> list[_Unit]:
    units: list[_Unit] = []
    for paragraph in _paragraphs(body):
        if count(paragraph) <= max_tokens:
            units.append(_Unit(paragraph, "\n\n"))
            continue
        joiner = "\n\n"
        if _FENCE.match(paragraph):
            # code: cut between lines, keeping each line's indentation and line breaks
            for line in paragraph.splitlines():
                for i, piece in enumerate(_fit(line, max_tokens, count)):
                    units.append(_Unit(piece, joiner if i == 0 else " "))
                joiner = "\n"
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            for piece in _fit(sentence, max_tokens, count):
                units.append(_Unit(piece, joiner))
                joiner = " "
    return units


def _fit(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    return [text] if count(text) <= max_tokens else _split_words(text, max_tokens, count)


def _join(units: list[_Unit]) -> str:
    return "".join((u.joiner if i else "") + u.text for i, u in enumerate(units))


def chunk_text(
    text: str,
    *,
    markdown: bool,
    max_tokens: int = DEFAULT_CHUNK_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
    count: Callable[[str], int] = count_tokens,
) -> list[Chunk]:
    """The chunks of one file's text, each at most ``max_tokens`` long."""
    if max_tokens < 1:
        raise ValueError(f"chunk size must be at least 1 token, not {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap ({overlap_tokens} tokens) must be at least 0 and below the chunk size "
            f"({max_tokens} tokens)"
        )
    chunks: list[Chunk] = []

    def emit(heading: str, units: list[_Unit]) -> None:
        body = _join(units).strip("\n")  # code cut between lines may leave blank edges
        chunks.append(Chunk(len(chunks), body, heading, count(body)))

    for heading, body in _sections(text, markdown):
        current: list[_Unit] = []
        fresh = False  # does ``current`` hold anything not yet emitted?
        for unit in _units(body, max_tokens, count):
            if current and count(_join([*current, unit])) > max_tokens:
                if fresh:
                    emit(heading, current)
                current = _tail(current, overlap_tokens, count)
                while current and count(_join([*current, unit])) > max_tokens:
                    current = current[1:]
            current.append(unit)
            fresh = True
        if current and fresh:
            emit(heading, current)
    return chunks


def _tail(units: list[_Unit], overlap_tokens: int, count: Callable[[str], int]) -> list[_Unit]:
    """The last whole units of a chunk that fit in the overlap."""
    tail: list[_Unit] = []
    for unit in reversed(units):
        if count(_join([unit, *tail])) > overlap_tokens:
            break
        tail.insert(0, unit)
    return tail


def is_markdown(path: str) -> bool:
    return path.lower().endswith((".md", ".markdown", ".mdx"))
