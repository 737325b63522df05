"""Regenerate the Python gRPC stubs in rpp_lightning/proto/ from protos/rpp/v1/*.proto.

    python scripts/gen_protos.py            # rewrite the committed stubs
    python scripts/gen_protos.py --check    # exit 1 if the committed stubs are stale

grpc_tools writes absolute imports (`from rpp.v1 import reward_pb2`), which would need a
top-level `rpp` package; we rewrite them to relative imports so the stubs live inside
`rpp_lightning.proto` and import without anything else on the path (no torch).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
STUB_DIR = ROOT / "rpp_lightning" / "proto"
_ABSOLUTE_IMPORT = re.compile(r"^from rpp\.v1 import (\w+_pb2)", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto under protos/rpp/v1 into `out_dir`; return the written files."""
    from grpc_tools import protoc  # dev-only dependency, imported here on purpose

    proto_files = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("rpp/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *proto_files,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_files}")
        written = []
        for src in sorted(Path(tmp, "rpp", "v1").iterdir()):
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def stale_files() -> list[str]:
    """Names of stubs in STUB_DIR that differ from (or are missing against) a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    committed = {p.name: p.read_text() for p in STUB_DIR.glob("*_pb2*.py*")}
    return sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, exit 1 when stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale stubs: {stale}; run python scripts/gen_protos.py", file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    for path in generate(STUB_DIR):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
