"""Regenerate the committed gRPC stubs of lmserve_protocols from the vendored proto.

    uv run python scripts/gen_grpc.py [--out DIR]

tests/test_grpc_stubs.py runs this into a temporary folder and checks that the committed
files are identical, so the stubs never drift from the proto.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "packages/protocols/src/lmserve_protocols/grpc"
PROTO = "grpc_predict_v2.proto"
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", str(PROTO_DIR / PROTO),
        ])  # fmt: skip
        if code != 0:
            raise SystemExit(f"protoc failed with {code}")
        written = []
        for name in GENERATED:
            text = (Path(tmp) / name).read_text()
            # Generated code imports its sibling as a top-level module; make it package-relative.
            text = text.replace(
                "import grpc_predict_v2_pb2 as",
                "from lmserve_protocols.grpc import grpc_predict_v2_pb2 as",
            )
            # A private descriptor pool: tritonclient registers the same `inference.*`
            # messages in the default pool, and lmserve imports both (Triton bridge, tests).
            text = text.replace("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()")
            target = out / name
            target.write_text(text)
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in generate(args.out):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
