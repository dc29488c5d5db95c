"""Strict configuration models and the YAML loader with secret references.

Every file deepgate reads goes through a model derived from ``StrictModel``: unknown keys are
errors, so a typo never silently turns a feature off. Secrets are references, never inlined:
``$env://NAME``, ``$file://PATH``, ``$vault://MOUNT/PATH#KEY`` or ``$sealed://TOKEN``, resolved when
the value is needed (``resolve_secret``, i.e. ``deepgate.secrets.resolve``; docs/secrets.md).
Errors name the file, the path inside it and what to change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ENV_PREFIX = "$env://"


class StrictModel(BaseModel):
    """Base of every config model: unknown keys rejected, values immutable after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or value is wrong; the message says where and how to fix it."""


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, ``path: message``, without echoing the offending values."""
    lines = []
    for item in err.errors(include_input=False, include_url=False):
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{path}: {item['msg']}")
    return "; ".join(lines)


def is_secret_ref(value: str) -> bool:
    """True for ``$env://``, ``$file://``, ``$vault://`` and ``$sealed://`` references."""
    from deepgate.secrets import is_ref

    return is_ref(value)


def resolve_secret(value: str) -> str:
    """The value behind a secret reference (other strings are returned as given).

    Raises ``deepgate.secrets.SecretError`` (a ConfigError) naming the reference, never the value.
    """
    from deepgate.secrets import resolve

    return resolve(value)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file, with the file name in any syntax error."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        # Name the place, not the text: the broken line may hold an inlined secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = getattr(exc, "context_mark", None)
        if context is not None and (mark is None or context.line != mark.line):
            where += f" (in what starts at line {context.line + 1})"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None


def load_model(path: str | Path, model: type[M]) -> M:
    """Load a YAML file into ``model``; errors say file, path and problem."""
    data = load_yaml(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None


DATA_DIR_ENV = "DEEPGATE_DATA_DIR"


def local_dsn(env: str, filename: str) -> str:
    """The DSN in variable ``env``, else ``sqlite://`` + ``filename`` under ``DEEPGATE_DATA_DIR``
    (``./run``): where one machine keeps its embedded databases (vectors, the usage ledger)."""
    explicit = os.environ.get(env, "").strip()
    if explicit:
        return explicit
    data_dir = Path(os.environ.get(DATA_DIR_ENV, "") or "run")
    return f"sqlite://{data_dir.resolve() / filename}"
