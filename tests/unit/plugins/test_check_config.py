"""deepgate-check-config finds every bad plugin conf in APISIX route files, with its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.check_config import check_document, main

ROOT = Path(__file__).resolve().parents[3]


def route(conf: list[object], phase: str = "ext-plugin-post-req") -> dict[str, object]:
    return {"routes": [{"uri": "/v1/chat/completions", "plugins": {phase: {"conf": conf}}}]}


def test_shipped_files_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert files
    assert main([str(f) for f in files]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_good_conf_passes() -> None:
    doc = route([{"name": "deepgate-prompt-filter", "value": '{"max_prompt_tokens": 10}'}])
    assert check_document(doc) == []


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "nope", "value": "{}"}, "unknown plugin 'nope'"),
        ({"name": "deepgate-prompt-filter", "value": "{bad"}, "not valid JSON"),
        ({"name": "deepgate-prompt-filter", "value": {"a": 1}}, "JSON string"),
        ({"name": "deepgate-prompt-filter", "value": '{"typo_key": 1}'}, "typo_key"),
        (
            {"name": "deepgate-prompt-filter", "value": '{"deny_patterns": ["("]}'},
            "deny_patterns[0]",
        ),
        ({"value": "{}"}, "needs a 'name'"),
    ],
)
def test_bad_entries_are_reported_with_their_path(entry: dict[str, object], expected: str) -> None:
    problems = check_document(route([{"name": "deepgate-prompt-filter", "value": "{}"}, entry]))
    assert len(problems) == 1
    assert problems[0].startswith("routes[0].plugins.ext-plugin-post-req.conf[1]")
    assert expected in problems[0]


def test_every_phase_and_section_is_checked() -> None:
    bad = {"name": "nope", "value": "{}"}
    doc = {
        "routes": [{"plugins": {"ext-plugin-pre-req": {"conf": [bad]}}}],
        "global_rules": [{"plugins": {"ext-plugin-post-resp": {"conf": [bad]}}}],
        "services": [{"plugins": {"ext-plugin-post-req": {"conf": "oops"}}}],
    }
    problems = check_document(doc)
    assert [p.split(":")[0] for p in problems] == [
        "routes[0].plugins.ext-plugin-pre-req.conf[0] (nope)",
        "services[0].plugins.ext-plugin-post-req",
        "global_rules[0].plugins.ext-plugin-post-resp.conf[0] (nope)",
    ]


def test_unreadable_file_fails_with_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "apisix.yaml"
    bad.write_text("routes: [unclosed\n")
    assert main([str(bad)]) == 1
    assert str(bad) in capsys.readouterr().out
