"""The committed gRPC stubs are exactly what the vendored proto generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "packages/protocols/src/lmserve_protocols/grpc"


def test_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_grpc.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)  # fmt: skip
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == [
        "grpc_predict_v2_pb2.py",
        "grpc_predict_v2_pb2.pyi",
        "grpc_predict_v2_pb2_grpc.py",
    ]
    for name in generated:
        assert (tmp_path / name).read_text() == (STUBS / name).read_text(), (
            f"{name} is stale: run scripts/gen_grpc.py"
        )


def test_service_matches_the_open_inference_protocol() -> None:
    from lmserve_protocols.grpc import grpc_predict_v2_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert pb.DESCRIPTOR.package == "inference"
    assert {m.name for m in service.methods} >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }
    fields = {f.name: f.number for f in pb.ModelInferRequest.DESCRIPTOR.fields}
    assert fields == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6,
                      "raw_input_contents": 7}  # fmt: skip
    contents = {f.name: f.number for f in pb.InferTensorContents.DESCRIPTOR.fields}
    assert contents["bytes_contents"] == 8 and contents["fp32_contents"] == 6
