"""The model's own forward pass, ONNX Runtime vs torch, by batch size (all-MiniLM-L6-v2).

No server: the limit each backend could reach. The graph is ``lmserve export``'s; both
runtimes get the same number of intra-op threads (the machine's cores) and the same padded
batch of one repeated 15-word sentence.

    uv run --no-sync python benchmarks/onnx_vs_torch_forward.py
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def main() -> None:
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    from lmserve_backend_hf.export import export_onnx
    from lmserve_core.builtin_models import locate_builtin

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    path = locate_builtin("all-minilm-l6-v2")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(path, "text_embedding", ["input_ids", "attention_mask"], Path(tmp))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(report.onnx_path), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        model = AutoModel.from_pretrained(str(path)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        print(f"{threads} threads; sequences/s (ONNX Runtime / torch = ratio)")
        for batch in (1, 8, 32):
            enc = tokenizer([TEXT] * batch, return_tensors="np", padding=True)
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def run_torch(tensors: dict[str, torch.Tensor] = tensors) -> object:
                with torch.inference_mode():
                    return model(**tensors)

            onnx_rate = per_second(lambda feeds=feeds: session.run(None, feeds), batch)  # type: ignore[misc]
            torch_rate = per_second(run_torch, batch)
            print(f"batch {batch:2d} ({feeds['input_ids'].shape[1]} tokens): "
                  f"{onnx_rate:6.1f} / {torch_rate:6.1f} = {onnx_rate / torch_rate:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
