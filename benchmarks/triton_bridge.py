"""Transformer mode + Triton vs. lmserve in-process (torch and ONNX Runtime), all-MiniLM-L6-v2.

One run on this machine, one configuration under load at a time:

1. ``lmserve export`` writes the built-in all-MiniLM-L6-v2 as a Triton repository (ONNX);
2. pytriton's bundled ``tritonserver`` (python-based ONNX Runtime backend, see
   ``tests/_support/triton.py``) serves it, ONNX Runtime with as many intra-op threads as
   this machine has cores;
3. ``lmserve serve --model_id all-minilm-l6-v2`` (torch, same thread count) is measured, then
   the same with ``--backend onnx`` (ONNX Runtime in-process), then
   ``lmserve serve --predictor_host ... --predictor_protocol v2`` and ``grpc-v2``;
4. each gets ``encoder_load.py``'s closed loop: V1 predict, one sentence per request, warm-up
   first, at concurrency 1 and 32.

Both lmserve and Triton share the same cores in transformer mode (as the load client does in
every configuration); the report says so next to the ratios.

    uv run --no-sync python benchmarks/triton_bridge.py --json-out benchmarks/results-triton-bridge.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the Triton and server helpers of the tests

from encoder_load import format_summary, run_encoder_load  # noqa: E402

from _support.servers import ServerProcess, start_server  # noqa: E402
from _support.triton import start_triton, unavailable_reason  # noqa: E402

MODEL = "all-minilm-l6-v2"
CHECK_TEXTS = ["A man is eating food.", "The new movie is awesome", "hi"]


def export_repository(repo: Path, threads: int) -> float:
    from lmserve_backend_hf.export import export_onnx
    from lmserve_core.builtin_models import locate_builtin

    started = time.perf_counter()
    report = export_onnx(locate_builtin(MODEL), "text_embedding", ["input_ids", "attention_mask"],
                         repo, model_name=MODEL)  # fmt: skip
    # The test backend reads ONNX Runtime's thread counts from the model's parameters.
    with report.config_path.open("a", encoding="utf-8") as fh:
        fh.write(
            f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}\n'
        )
    return time.perf_counter() - started


def embeddings(server: ServerProcess) -> np.ndarray:
    with server.client() as client:
        r = client.post(f"/v1/models/{MODEL}:predict", json={"instances": CHECK_TEXTS})
    r.raise_for_status()
    return np.asarray(r.json()["predictions"], dtype=np.float32)


def measure(server: ServerProcess, label: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"label": label}
    for concurrency in (1, args.concurrency):
        requests = args.requests if concurrency > 1 else max(64, args.requests // 5)
        m = asyncio.run(run_encoder_load(server.url, MODEL, concurrency=concurrency,
                                         requests=requests, warmup=args.warmup))  # fmt: skip
        print(f"  {label}: {format_summary(m)}", flush=True)
        out[f"c{concurrency}"] = m
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=960, help="measured requests at concurrency")
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"Triton cannot run here: {reason}", file=sys.stderr)
        return 2
    threads = len(os.sched_getaffinity(0))
    env = {"OMP_NUM_THREADS": str(threads)}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {threads} cores, Python {platform.python_version()}",
        "model": MODEL,
        "threads": threads,
    }
    with tempfile.TemporaryDirectory(prefix="lmserve-bench-repo-") as tmp:
        repo = Path(tmp)
        results["export_seconds"] = export_repository(repo, threads)
        print(f"exported {MODEL} in {results['export_seconds']:.1f} s", flush=True)

        local = start_server(
            ["--model_id", MODEL, "--model_name", MODEL, "--torch_threads", str(threads)], env=env
        )
        try:
            reference = embeddings(local)
            results["in_process"] = measure(local, "in-process (torch)", args)
        finally:
            local.stop()

        # --backend onnx exports on its first start (cached after): not part of the timing.
        onnx = start_server(["--model_id", MODEL, "--model_name", MODEL, "--backend", "onnx",
                             "--torch_threads", str(threads)], env=env, timeout=600)  # fmt: skip
        try:
            got = embeddings(onnx)
            results["in_process_onnx"] = {
                **measure(onnx, "in-process (--backend onnx)", args),
                "min_cosine_vs_in_process": float(np.min(np.sum(got * reference, axis=1))),
            }
        finally:
            onnx.stop()

        triton = start_triton(repo)
        try:
            for protocol, host in (("v2", triton.http_host), ("grpc-v2", triton.grpc_url)):
                server = start_server(["--model_id", MODEL, "--model_name", MODEL, "--predictor_host", host,
                                       "--predictor_protocol", protocol,
                                       "--tensor_input_names", "input_ids,attention_mask"],
                                      env=env)  # fmt: skip
                try:
                    got = embeddings(server)
                    cosine = float(np.min(np.sum(got * reference, axis=1)))
                    results[f"transformer_{protocol}"] = {
                        **measure(server, f"transformer mode ({protocol}) + Triton", args),
                        "min_cosine_vs_in_process": cosine,
                    }
                finally:
                    server.stop()
        finally:
            triton.stop()

    base = results["in_process"][f"c{args.concurrency}"]["requests_per_s"]
    print(f"\nconcurrency {args.concurrency}, requests/s (ratio to in-process):")
    keys = ("in_process", "in_process_onnx", "transformer_v2", "transformer_grpc-v2")
    for key in keys:
        rps = results[key][f"c{args.concurrency}"]["requests_per_s"]
        results[key]["ratio_vs_in_process"] = rps / base
        print(f"  {results[key]['label']:<38} {rps:7.1f}  {rps / base:5.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    failed = sum(results[k][c]["failed"] for k in keys for c in ("c1", f"c{args.concurrency}"))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except httpx.HTTPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
