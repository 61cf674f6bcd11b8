"""Generate the Python protobuf and gRPC stubs from protos/ into services/common/pb.

Usage: python scripts/gen_protos.py [OUTPUT_DIR]

The generated modules import each other as `pagewire.v1.*`; they are rewritten
to import from `pagewire.v1` so no extra top-level package
is needed. tests/test_protos.py fails when the checked-in stubs differ from
what this script produces.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = PROTO_ROOT


def generate(out_dir: Path) -> list[Path]:
    import google.rpc.status_pb2  # googleapis-common-protos ships status.proto beside it
    import grpc_tools
    from grpc_tools import protoc

    googleapis_root = Path(google.rpc.status_pb2.__file__).resolve().parent.parent.parent
    well_known_root = Path(grpc_tools.__file__).resolve().parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{googleapis_root}",
            f"-I{well_known_root}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + " ".join(protos))
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(src.read_text())
            written.append(rel)
    (out_dir / "pagewire" / "v1" / "__init__.py").touch()
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for rel in generate(out):
        sys.stdout.write(f"{out / rel}\n")
