"""``deepgate secrets``: seal provider keys at rest, open them to check, rotate them.

    deepgate secrets keygen --out run/seal.key           # a local sealing key (no Vault)
    printf %s "$KEY" | deepgate secrets seal --out run/secrets/openai.sealed
    deepgate secrets open --file run/secrets/openai.sealed    # prints the value
    deepgate secrets open '$vault://secret/deepgate/openai#api_key'
    printf %s "$NEW" | deepgate secrets rotate --file run/secrets/openai.sealed --new-value
    deepgate secrets rotate --file run/secrets/openai.sealed --rotate-key

Values are read from stdin, never from the command line (it shows in ``ps`` and shell history).
Sealed files are written atomically with mode 0600; a config refers to one as
``$file://run/secrets/openai.sealed`` (the resolver opens sealed contents). See docs/secrets.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from deepgate.secrets import SEALED, SecretError, is_ref, resolve, sealed, vault


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    seal = actions.add_parser("seal", help="seal a value read from stdin")
    seal.add_argument(
        "--backend",
        choices=("transit", "local"),
        default=None,
        help="transit (Vault/OpenBao) or local key; default: transit if VAULT_ADDR",
    )
    seal.add_argument("--key", default=None, help="the transit key name (default: deepgate)")
    seal.add_argument(
        "--create-key", action="store_true", help="create the transit key if it does not exist"
    )
    seal.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the sealed value to this file (mode 0600) instead of stdout",
    )

    opener = actions.add_parser("open", help="print the value behind a reference or sealed file")
    source = opener.add_mutually_exclusive_group(required=True)
    source.add_argument("ref", nargs="?", help="a $sealed:// token or any secret reference")
    source.add_argument("--file", type=Path, help="a file holding a sealed value")

    rotate = actions.add_parser("rotate", help="re-seal a sealed file (new value or key version)")
    rotate.add_argument("--file", type=Path, required=True, help="the sealed file, rewritten")
    rotate.add_argument(
        "--new-value",
        action="store_true",
        help="seal a new value read from stdin (a rotated provider key)",
    )
    rotate.add_argument(
        "--rotate-key",
        action="store_true",
        help="transit: rotate the transit key first, then rewrap",
    )

    keygen = actions.add_parser("keygen", help="write a new local sealing key file")
    keygen.add_argument("--out", type=Path, required=True, help="the key file (mode 0600)")


def _say(text: str, stream: TextIO | None = None) -> None:
    """Command output (a value or a sealed token on stdout, notes on stderr); never a log."""
    (stream or sys.stdout).write(text + "\n")


def _read_stdin_value() -> str:
    value = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not value:
        raise SecretError('no value on stdin: pipe the secret in, e.g. printf %s "$KEY" | ...')
    return value


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    if path.exists() and not replace:
        raise SecretError(f"{path} exists; remove it first or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise SecretError(f"{path}: cannot read the sealed file") from None


def _seal(args: argparse.Namespace) -> int:
    value = _read_stdin_value()
    backend = args.backend or sealed.default_backend()
    if backend == "transit" and args.create_key:
        vault.ensure_transit_key(args.key or sealed.transit_key_name())
    token = sealed.seal(value, backend, args.key)
    if args.out is None:
        _say(token.ref())
    else:
        _write_private(args.out, token.ref(), replace=False)
        _say(f"sealed ({backend}, key {token.key_id}) into {args.out}", sys.stderr)
    return 0


def _open(args: argparse.Namespace) -> int:
    if args.file is not None:
        text = _read_file(args.file)
        value = sealed.open_token(text, f"$file://{args.file}")
    else:
        ref = args.ref if is_ref(args.ref) else SEALED + args.ref
        value = resolve(ref)
    _say(value)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    text = _read_file(args.file)
    new_value = _read_stdin_value() if args.new_value else None
    token = sealed.reseal(text, new_value, args.rotate_key, f"$file://{args.file}")
    _write_private(args.file, token.ref(), replace=True)
    what = "new value" if new_value is not None else "rewrapped"
    _say(f"rotated {args.file} ({what}, {token.backend} key {token.key_id})", sys.stderr)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    _write_private(args.out, sealed.generate_local_key(), replace=False)
    _say(
        f"wrote a new local sealing key to {args.out}; set DEEPGATE_SEAL_KEY_FILE={args.out}",
        sys.stderr,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    action = {"seal": _seal, "open": _open, "rotate": _rotate, "keygen": _keygen}[args.action]
    try:
        return action(args)
    except SecretError as exc:
        _say(f"deepgate secrets {args.action}: {exc}", sys.stderr)
        return 1
