"""``deepgate-check-config``: validate the plugin confs in APISIX route files before deploying.

APISIX hands each ``ext-plugin-*`` conf entry to the runner as a name and a JSON string; the runner
refuses a bad one at PrepareConf, which turns into 503s for that route in production. This command
finds every such entry in APISIX standalone YAML files (routes, services, plugin configs, global
rules) and validates it with the same models the runner uses, so the mistake is caught at review
time. Each problem is printed as ``file: path: problem``; the exit status is 1 if any was found.

Usage: ``deepgate-check-config [FILE ...]`` (default: every YAML file under ``apisix-conf/`` and
``examples/``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from deepgate.config import ConfigError, describe_validation_error, load_yaml
from plugins.base import PluginSpec
from plugins.registry import REGISTRY

log = logging.getLogger("deepgate.check_config")

EXT_PLUGINS = ("ext-plugin-pre-req", "ext-plugin-post-req", "ext-plugin-post-resp")
SECTIONS = ("routes", "services", "plugin_configs", "global_rules", "consumers")
DEFAULT_DIRS = ("apisix-conf", "examples")


def _plugin_blocks(doc: Any) -> Iterator[tuple[str, Any]]:
    """(path, ext-plugin conf) for every ext-plugin block of an APISIX standalone document."""
    if not isinstance(doc, dict):
        return
    for section in SECTIONS:
        items = doc.get(section)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            plugins = item.get("plugins") if isinstance(item, dict) else None
            if not isinstance(plugins, dict):
                continue
            for ext in EXT_PLUGINS:
                if ext in plugins:
                    yield f"{section}[{i}].plugins.{ext}", plugins[ext]


def check_entry(spec: PluginSpec | None, name: str, value: Any) -> str | None:
    """The problem with one conf entry, or ``None``."""
    if spec is None:
        return f"unknown plugin {name!r}; known: {', '.join(sorted(REGISTRY))}"
    if not isinstance(value, str):
        return "value must be the plugin's config as a JSON string (APISIX passes it verbatim)"
    try:
        spec.config.model_validate(orjson.loads(value or "{}"))
    except orjson.JSONDecodeError as exc:
        return f"value is not valid JSON: {exc}"
    except ValidationError as exc:
        return f"invalid {name} config: {describe_validation_error(exc)}"
    return None


def check_document(doc: Any) -> list[str]:
    """Every problem in one parsed document, as ``path: problem``."""
    problems = []
    for path, block in _plugin_blocks(doc):
        conf = block.get("conf") if isinstance(block, dict) else None
        if not isinstance(conf, list):
            problems.append(f"{path}: needs a 'conf' list of {{name, value}} entries")
            continue
        for j, entry in enumerate(conf):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                problems.append(f"{path}.conf[{j}]: each entry needs a 'name' and a 'value'")
                continue
            name = entry["name"]
            problem = check_entry(REGISTRY.get(name), name, entry.get("value", "{}"))
            if problem:
                problems.append(f"{path}.conf[{j}] ({name}): {problem}")
    return problems


def default_files(root: Path) -> list[Path]:
    return sorted(p for d in DEFAULT_DIRS for p in (root / d).glob("**/*.y*ml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    files = args.files or default_files(Path.cwd())
    out = sys.stdout
    failed = 0
    for path in files:
        try:
            problems = check_document(load_yaml(path))
        except ConfigError as exc:
            problems = [str(exc)]
        for problem in problems:
            out.write(f"{path}: {problem}\n")
        failed += len(problems)
    out.write(f"checked {len(files)} file(s): {failed} problem(s)\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
