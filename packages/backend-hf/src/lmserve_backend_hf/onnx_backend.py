"""``--backend onnx``: encoders run in-process by ONNX Runtime.

The model is exported once with ``lmserve export``'s exporter (parity with PyTorch checked,
progress logged) into ``$LMSERVE_CACHE_DIR/onnx/<model>-<key>/``; later starts load the cached
graph with no torch import at all. The key covers the model's files (names, sizes, mtimes),
the task, the input tensors and the exporter's own source, so a changed model exports again.

Why: on this project's 2-core CPU ONNX Runtime runs all-MiniLM-L6-v2's forward pass 2.6x faster
than torch at batch 1 and 1.2x at batch 32 (BENCHMARKS.md); the CUDA execution provider is used
when available.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmserve_backend_hf.encoder_info import EncoderParts, graph_encoder_parts
from lmserve_backend_hf.onnxruntime_extra import import_onnxruntime
from lmserve_backend_hf.triton_contract import reranker_graph_parts
from lmserve_core.backend import (
    IN_PROCESS_BATCH_SIZE,
    IN_PROCESS_CHUNK_ROWS,
    LoadedEncoder,
    LoadRequest,
)
from lmserve_core.builtin_models import cache_lock, cache_root
from lmserve_core.encoder import ENCODER_TASKS
from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import ModelSource
from lmserve_core.tasks import Task

__all__ = ["OnnxEncoder", "load_onnx_encoder"]

logger = logging.getLogger(__name__)

_EXPORT_NAME = "model"


class OnnxEncoder:
    """lmserve_core's ``EncoderBackend`` over an ONNX Runtime session (thread-safe)."""

    def __init__(self, session: Any, *, inputs: Sequence[str], output: str) -> None:
        self.session = session
        self.inputs = tuple(inputs)
        self.output = output

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        feeds = {}
        for name in self.inputs:
            array = inputs.get(name)
            feeds[name] = np.zeros_like(inputs["input_ids"]) if array is None else array
        (result,) = self.session.run([self.output], feeds)
        return np.asarray(result, dtype=np.float32)

    def check_health(self) -> None:
        """An in-process session is healthy while it exists."""

    def close(self) -> None:
        self.session = None


def cache_key(source: ModelSource, task: Task, inputs: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{task.value}|{','.join(inputs)}".encode())
    for path in sorted(p for p in source.path.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source.path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    # A fixed exporter may write a different graph: its source is part of the key.
    digest.update((Path(__file__).parent / "export.py").read_bytes())
    return digest.hexdigest()[:16]


def exported_model(source: ModelSource, task: Task, inputs: Sequence[str]) -> Path:
    """The cached ONNX graph of this model, exported (and parity-checked) on first use."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.path.name)[:60]
    folder = cache_root() / "onnx" / f"{name}-{cache_key(source, task, inputs)}"
    onnx_path = folder / _EXPORT_NAME / "1" / "model.onnx"
    # One export per cache entry even when several servers start at once.
    with cache_lock(folder.with_suffix(".lock")):
        if onnx_path.is_file():
            logger.info("ONNX graph of %s from the cache: %s", source.display_name, onnx_path)
            return onnx_path
        from lmserve_backend_hf.export import export_onnx

        logger.info("exporting %s to ONNX once (cached in %s)", source.display_name, folder)
        report = export_onnx(
            source.path, task, list(inputs), folder, model_name=_EXPORT_NAME,
            progress=lambda message: logger.info("export: %s", message),
        )  # fmt: skip
        logger.info(
            "exported in %.1f s: %s exporter, opset %d, ONNX Runtime vs PyTorch max abs diff %.1e",
            report.seconds, report.exporter, report.opset, report.max_abs_diff,
        )  # fmt: skip
        return report.onnx_path


def _session(path: Path, threads: int) -> tuple[Any, list[str]]:
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads sleep rather than spin: the event loop shares these cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    return session, list(session.get_providers())


def onnx_parts(request: LoadRequest) -> EncoderParts:
    """Tokenizer, model facts and the graph's inputs (--tensor_input_names, checked)."""
    parts = graph_encoder_parts(request)
    if request.task is Task.rerank:  # a BERT cross-encoder's graph takes token types
        parts = reranker_graph_parts(
            parts, request.config, request.source.display_name,
            names_given=bool(request.settings.tensor_input_name_list),
        )  # fmt: skip
    return parts


def load_onnx_encoder(request: LoadRequest) -> LoadedEncoder:
    settings, source, task = request.settings, request.source, request.task
    if task not in ENCODER_TASKS:
        raise ConfigurationError(
            f"--backend onnx serves encoder tasks; {task.value} is not one", param="backend"
        )
    if settings.dtype not in ("auto", "float32", "float"):
        raise ConfigurationError(
            "--backend onnx runs the float32 export; drop --dtype or use --backend huggingface",
            param="dtype",
        )
    started = time.perf_counter()
    parts = onnx_parts(request)
    names, info = parts.input_names, parts.info
    onnx_path = exported_model(source, task, names)
    threads = settings.torch_threads or len(os.sched_getaffinity(0))
    session, providers = _session(onnx_path, threads)
    output = ENCODER_TASKS[task].model_output
    logger.info(
        "loaded %s (%s) with ONNX Runtime on %s in %.1f s: max_length %d, intra-op threads %d",
        source.display_name, task.value, providers[0], time.perf_counter() - started,
        info.max_length, threads,
    )  # fmt: skip
    return LoadedEncoder(
        backend=OnnxEncoder(session, inputs=names, output=output),
        tokenizer=parts.tokenizer,
        info=info,
        options=parts.options,
        details={
            "onnx": str(onnx_path),
            "providers": providers,
            "intra_op_threads": threads,
            "dtype": "float32",
            "architecture": (request.config.get("architectures") or ["?"])[0],
        },
        chunk_rows=IN_PROCESS_CHUNK_ROWS,
        default_batch_size=IN_PROCESS_BATCH_SIZE,
    )
