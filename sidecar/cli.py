"""``deepgate``: the operator's command line (RAG ingestion, the usage ledger's writer, reports).

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
this file only names them, so ``deepgate --help`` stays fast (nothing heavy is imported until a
subcommand runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deepgate.logs import setup_logging

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "rag": ("sidecar.rag_cli", "ingest files into a RAG collection, or query one"),
    "ledger": ("sidecar.ledger_writer", "write usage records from Redis to the ledger database"),
    "usage": ("sidecar.usage_report", "print usage totals per consumer, model and day"),
    "secrets": ("sidecar.secrets_cli", "seal, open and rotate secrets (provider keys at rest)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepgate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    setup_logging("deepgate")
    args = build_parser().parse_args(argv)
    sys.exit(importlib.import_module(args.module).run(args))
