"""The model's own forward pass, ONNX Runtime vs torch, by batch size (all-MiniLM-L6-v2).

No server: the limit each backend could reach. The graph is ``lmserve export``'s; both
runtimes get the same number of intra-op threads (the machine's cores) and the same padded
batch of one repeated 15-word sentence.

``measure(device)`` is the run as a function: ``benchmarks/gpu_bench.py`` calls it with
``device="cuda"`` (ONNX Runtime's CUDAExecutionProvider vs torch on the GPU; both copy the
inputs to the GPU and ``last_hidden_state`` back on every call, as ``session.run`` does).

    uv run --no-sync python benchmarks/onnx_vs_torch_forward.py
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TEXT = "The quick brown fox jumps over the lazy dog near the river bank early today."


def per_second(fn: Callable[[], object], batch: int) -> float:
    for _ in range(3):
        fn()
    runs = max(5, 200 // batch)
    started = time.perf_counter()
    for _ in range(runs):
        fn()
    return batch * runs / (time.perf_counter() - started)


def measure(
    device: str = "cpu", batches: Sequence[int] = (1, 8, 32), threads: int | None = None
) -> dict[str, Any]:
    """Sequences/s of ONNX Runtime and torch on ``device`` ("cpu" or "cuda") at each batch size.

    On "cuda" the session must run on CUDAExecutionProvider (RuntimeError if ONNX Runtime
    falls back to the CPU, as it does silently without the onnx-cuda build)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from lmserve_backend_hf.export import export_onnx
    from lmserve_core.builtin_models import locate_builtin

    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    # After torch: on CUDA, ONNX Runtime then finds the CUDA and cuDNN libraries torch loaded.
    import onnxruntime as ort

    path = locate_builtin("all-minilm-l6-v2")
    logging.disable(logging.WARNING)
    providers = ["CPUExecutionProvider"]
    if device != "cpu":
        providers.insert(0, "CUDAExecutionProvider")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(path, "text_embedding", ["input_ids", "attention_mask"], Path(tmp))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(report.onnx_path), options, providers=providers)
        if session.get_providers()[0] != providers[0]:
            raise RuntimeError(f"ONNX Runtime runs the session on {session.get_providers()}, "
                               f"not {providers[0]} (onnxruntime {ort.__version__}; its log "
                               "above names the CUDA library it could not load)")  # fmt: skip
        model = AutoModel.from_pretrained(str(path)).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        on = "" if device == "cpu" else f" on {device}"
        print(f"{threads} threads{on}; sequences/s (ONNX Runtime / torch = ratio)")
        for batch in batches:
            enc = tokenizer([TEXT] * batch, return_tensors="np", padding=True)
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def run_torch(tensors: dict[str, torch.Tensor] = tensors) -> object:
                with torch.inference_mode():
                    if device == "cpu":
                        return model(**tensors)
                    out = model(**{k: v.to(device) for k, v in tensors.items()})
                    return out.last_hidden_state.cpu()  # waits for the GPU, as session.run

            onnx_rate = per_second(lambda feeds=feeds: session.run(None, feeds), batch)  # type: ignore[misc]
            torch_rate = per_second(run_torch, batch)
            tokens = int(feeds["input_ids"].shape[1])
            print(f"batch {batch:2d} ({tokens} tokens): "
                  f"{onnx_rate:6.1f} / {torch_rate:6.1f} = {onnx_rate / torch_rate:.2f}x")  # fmt: skip
            rows.append({"batch": batch, "tokens": tokens, "onnx_sequences_per_s": onnx_rate,
                         "torch_sequences_per_s": torch_rate,
                         "onnx_over_torch": onnx_rate / torch_rate})  # fmt: skip
    return {
        "device": device,
        "threads": threads,
        "onnx_providers": session.get_providers(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "batches": rows,
    }


def main() -> None:
    measure("cpu")


if __name__ == "__main__":
    main()
