"""all-MiniLM-L6-v2's forward pass by batch size: torch (transformers.AutoModel) vs ONNX Runtime.

Both run behind the server's own EncoderBackend wrappers (``TorchEncoder``, ``OnnxEncoder``:
numpy in, float32 numpy out) on 2 intra-op threads (``torch.set_num_threads``, ORT's
``intra_op_num_threads``), with the same inputs: the first N of PROMPTS tokenized by
tokenizer.json and right-padded by ``pad_encodings`` to the batch's longest text, as the
encoder service does. The ONNX graph is ``lmserve export``'s, exported once per session.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.benchmark(group="encoder-forward")

BATCHES = [1, 8, 32]
ROUNDS = {1: 30, 8: 10, 32: 6}  # keeps each case around a second on 2 cores
INPUTS = ["input_ids", "attention_mask"]
HIDDEN = 384
# The project's CPU machines have 2 cores; LMSERVE_BENCH_THREADS overrides it (1 is steadier
# when other work shares the machine: torch's 2-thread forward slows down badly under contention).
THREADS = int(os.environ.get("LMSERVE_BENCH_THREADS", "2"))


@pytest.fixture(scope="module")
def torch_encoder(model_path: Path) -> Any:
    import torch
    from transformers import AutoModel

    from lmserve_backend_hf.encoder import TorchEncoder

    torch.set_num_threads(THREADS)
    model = AutoModel.from_pretrained(str(model_path)).eval()
    return TorchEncoder(model, device=torch.device("cpu"), output="last_hidden_state")


@pytest.fixture(scope="session")
def onnx_path(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmserve_backend_hf.export import export_onnx

    report = export_onnx(
        model_path, "text_embedding", INPUTS, tmp_path_factory.mktemp("onnx-export")
    )
    return Path(report.onnx_path)


@pytest.fixture(scope="module")
def onnx_encoder(onnx_path: Path) -> Any:
    import onnxruntime as ort

    from lmserve_backend_hf.onnx_backend import OnnxEncoder

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return OnnxEncoder(session, inputs=INPUTS, output="last_hidden_state")


@pytest.fixture(scope="module")
def padded(
    rust_tokenizer: Any, prompt_batch: Callable[[int], list[str]]
) -> Callable[[int], dict[str, np.ndarray]]:
    from lmserve_core.encoder.service import pad_encodings

    def make(batch: int) -> dict[str, np.ndarray]:
        encodings = rust_tokenizer.encode_batch(
            prompt_batch(batch), add_special_tokens=True, max_length=256
        )
        return pad_encodings(
            encodings,
            pad_id=rust_tokenizer.pad_token_id,
            length=max(len(e) for e in encodings),
            with_token_types=False,
        )

    return make


def _run(
    benchmark: Any, encoder: Any, inputs: dict[str, np.ndarray], record: Callable[..., None]
) -> None:
    batch, length = inputs["input_ids"].shape
    out = benchmark.pedantic(
        encoder.forward, args=(inputs,), rounds=ROUNDS[batch], iterations=1, warmup_rounds=2
    )
    assert out.shape == (batch, length, HIDDEN) and out.dtype == np.float32
    record(benchmark, batch, padded_length=length, threads=THREADS)


@pytest.mark.parametrize("batch", BATCHES)
def test_forward_torch(
    benchmark: Any,
    torch_encoder: Any,
    padded: Callable[[int], dict[str, np.ndarray]],
    record_rate: Callable[..., None],
    batch: int,
) -> None:
    _run(benchmark, torch_encoder, padded(batch), record_rate)


@pytest.mark.parametrize("batch", BATCHES)
def test_forward_onnx(
    benchmark: Any,
    onnx_encoder: Any,
    padded: Callable[[int], dict[str, np.ndarray]],
    record_rate: Callable[..., None],
    batch: int,
) -> None:
    _run(benchmark, onnx_encoder, padded(batch), record_rate)
