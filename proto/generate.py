"""Build the Python gRPC modules from ``proto/`` into ``sidecar/_proto/`` (run by make).

The generated code is built, not committed and not hand-edited. protoc writes imports that
follow the proto package (``deepgate.v1``), which would collide with our ``deepgate`` package, so
the imports are rewritten to the generated location.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sidecar" / "_proto"


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    OUT.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        return 1
    generated = [*OUT.rglob("*.py"), *OUT.rglob("*.pyi")]  # never __pycache__'s .pyc files
    for path in generated:
        text = path.read_text()
        fixed = text.replace("from deepgate.v1 import", "from sidecar._proto.deepgate.v1 import")
        if fixed != text:
            path.write_text(fixed)
    for folder in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
