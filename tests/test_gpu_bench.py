"""benchmarks/gpu_bench.py's dry run (``--device cpu``): every part runs and reports numbers.

The GPU run itself needs a CUDA machine; this checks the same code paths on the CPU with
the script's tiny dry-run sizes (2 streams of 8 tokens, a few encoder requests, ONNX
batches 1 and 8): both generation servers start one after the other, the encoder server
once, and the ONNX export once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _support.servers import VLLM_TEST_ENV, server_site_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"

RATIOS = ("output_tok_s_lmserve_over_vllm", "ttft_p50_lmserve_over_vllm",
          "ttft_p99_lmserve_over_vllm")  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_gpu_bench_dry_run_measures_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--json-out", str(out),
         "--startup-timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, **VLLM_TEST_ENV, **server_site_env()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())

    assert report["device"] == "cpu" and report["device_name"]
    assert report["failed_parts"] == []
    for version in ("torch", "vllm", "onnxruntime"):
        assert report["versions"][version], version
    parts = report["parts"]
    assert set(parts) == {"generation", "encoders", "onnx_vs_torch"}
    for name, part in parts.items():
        assert part["ok"] is True and part["error"] is None, (name, part.get("error"))

    gen = parts["generation"]
    for server in ("lmserve-vllm", "vllm"):
        s = gen["servers"][server]
        assert s["completed"] == 4 and s["errors"] == 0 and s["token_count_mismatches"] == 0
    for ratio in RATIOS:
        assert gen["ratios"][ratio] > 0, ratio
    assert parts["encoders"]["limit"]["batch"] == 4
    assert set(parts["encoders"]["served"]) == {"1", "4"}
    assert [row["batch"] for row in parts["onnx_vs_torch"]["batches"]] == [1, 8]
    assert parts["onnx_vs_torch"]["onnx_providers"][0] == "CPUExecutionProvider"

    figures = report["figures"]
    assert {f"generation.{r}" for r in RATIOS} <= set(figures)
    assert {"generation.lmserve-vllm.output_tok_s", "generation.vllm.ttft_ms_p99",
            "encoders.limit_sequences_per_s", "encoders.c4.ratio_to_limit",
            "onnx_vs_torch.b8.onnx_over_torch"} <= set(figures)  # fmt: skip
    not_positive = {k: v for k, v in figures.items() if not (type(v) in (int, float) and v > 0)}
    assert not not_positive
    assert "| lmserve / vLLM |" in proc.stdout and "All parts ran." in proc.stdout
