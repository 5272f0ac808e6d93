"""Regenerate the checked-in gRPC stubs from proto/dni.proto.

    python -m dni_dist.wire.generate          # rewrite dni_dist/wire/dni_pb2*.py
    python -m dni_dist.wire.generate --check  # exit 1 if they are stale

grpc_tools writes ``import dni_pb2`` (a top-level import); inside a package that must be
relative, so the one line is rewritten. The tests run ``--check``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE.parents[1] / "proto" / "dni.proto"
OUTPUTS = ("dni_pb2.py", "dni_pb2.pyi", "dni_pb2_grpc.py")


def generate(proto: Path, out_dir: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{proto.parent}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {proto}")
    grpc_module = out_dir / "dni_pb2_grpc.py"
    text = grpc_module.read_text().replace("import dni_pb2 as dni__pb2", "from . import dni_pb2 as dni__pb2")
    grpc_module.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(PROTO, HERE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(PROTO, Path(tmp))
        stale = [n for n in OUTPUTS if (Path(tmp) / n).read_text() != (HERE / n).read_text()]
    if stale:
        print(f"stale gRPC stubs: {', '.join(stale)}; run python -m dni_dist.wire.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
