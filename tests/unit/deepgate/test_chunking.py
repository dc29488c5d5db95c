"""Chunks for RAG: headings respected, sizes in tokens, overlap between neighbours."""

from __future__ import annotations

import itertools

import pytest

from deepgate.chunking import chunk_text, count_tokens, is_markdown

LONG = " ".join(f"Step {i} of the install copies file number {i} into place." for i in range(60))

DOC = f"""# Deepgate

Deepgate is an AI gateway.

## Install

{LONG}

```sh
# a comment, not a heading

make run
```

### Linux

Use the package manager.

## Use

Point the OpenAI SDK at the gateway.
"""


def test_chunks_follow_the_headings() -> None:
    chunks = chunk_text(DOC, markdown=True, max_tokens=80, overlap_tokens=20)
    headings = [c.heading for c in chunks]
    assert headings[0] == "Deepgate"
    assert chunks[0].text == "Deepgate is an AI gateway."
    assert "Deepgate > Install > Linux" in headings
    assert headings[-1] == "Deepgate > Use"
    assert chunks[-1].text == "Point the OpenAI SDK at the gateway."
    # a "#" line inside a code fence is not a heading, and the fence stays whole
    assert not any("a comment" in h for h in headings)
    (fenced,) = [c for c in chunks if "```sh" in c.text]
    assert "# a comment, not a heading\n\nmake run\n```" in fenced.text
    assert fenced.heading == "Deepgate > Install"
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_no_chunk_exceeds_the_size_and_all_text_is_kept() -> None:
    chunks = chunk_text(DOC, markdown=True, max_tokens=80, overlap_tokens=20)
    assert all(c.tokens == count_tokens(c.text) <= 80 for c in chunks)
    for i in range(60):
        assert any(f"copies file number {i} into" in c.text for c in chunks), i


def test_neighbours_overlap_by_whole_sentences() -> None:
    chunks = [
        c
        for c in chunk_text(DOC, markdown=True, max_tokens=80, overlap_tokens=20)
        if c.heading == "Deepgate > Install"
    ]
    assert len(chunks) >= 3
    for before, after in itertools.pairwise(chunks):
        last_sentence = before.text.rsplit(". ", 1)[-1]
        assert after.text.startswith(last_sentence.split("\n")[0])
    no_overlap = chunk_text(LONG, markdown=False, max_tokens=80, overlap_tokens=0)
    sentences = sum(c.text.count("Step ") for c in no_overlap)
    assert sentences == 60


def test_plain_text_has_no_headings() -> None:
    text = "# not markdown\n\nfirst paragraph\n\nsecond paragraph"
    chunks = chunk_text(text, markdown=False, max_tokens=200)
    assert [(c.heading, c.text) for c in chunks] == [("", text)]


def test_a_word_run_longer_than_a_chunk_is_cut_at_words() -> None:
    text = " ".join(["word"] * 500)  # no sentence end at all
    chunks = chunk_text(text, markdown=False, max_tokens=50, overlap_tokens=0)
    assert len(chunks) >= 10
    assert all(c.tokens <= 50 for c in chunks)
    assert sum(c.text.count("word") for c in chunks) == 500


def test_empty_and_heading_only_files_have_no_chunks() -> None:
    assert chunk_text("", markdown=True) == []
    assert chunk_text("# Title\n\n## Empty\n", markdown=True) == []


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_bad_sizes_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match=r"chunk size|overlap"):
        chunk_text("text", markdown=False, max_tokens=size, overlap_tokens=overlap)


def test_markdown_is_known_by_its_extension() -> None:
    assert is_markdown("docs/A.MD")
    assert is_markdown("x.markdown")
    assert not is_markdown("notes.txt")


def test_a_long_code_block_is_cut_between_lines() -> None:
    lines = [f"    run_step --number {i} --verbose" for i in range(80)]
    text = "# Script\n\n```sh\n" + "\n".join(lines) + "\n```\n"
    chunks = chunk_text(text, markdown=True, max_tokens=60, overlap_tokens=0)
    assert len(chunks) > 3
    assert all(c.tokens <= 60 for c in chunks)
    assert chunks[0].text.startswith("```sh\n    run_step --number 0 --verbose\n    run_step")
    kept = [line for c in chunks for line in c.text.splitlines() if "run_step" in line]
    assert kept == lines  # every line whole, indented, in order
