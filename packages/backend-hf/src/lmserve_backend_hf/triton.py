"""Transformer mode (SPEC §6): tokenize here, run the model on a Triton server.

``lmserve serve --predictor_host HOST:PORT --predictor_protocol v2|grpc-v2
--tensor_input_names input_ids,attention_mask`` loads the tokenizer and the model's JSON files
only, never torch: the encoder pipeline of lmserve_core tokenizes, batches (padded to a few
length buckets so Triton's dynamic batcher can merge what arrives together) and
post-processes, and this module sends the named INT64 tensors to Triton with the official
``tritonclient`` and returns the model output it asked for (``logits``, or
``last_hidden_state`` that core pools into embeddings).

The served model name is the Triton model name, as in KServe's transformer/predictor pairs.
Errors Triton answers become ``PredictorError`` (HTTP 502) with Triton's own message; a
predictor that cannot be reached makes readiness 503 until it answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmserve_backend_hf.encoder_info import graph_encoder_parts
from lmserve_core.backend import LoadedEncoder, LoadRequest
from lmserve_core.encoder import ENCODER_TASKS
from lmserve_core.errors import ConfigurationError, ModelNotReady, PredictorError
from lmserve_core.settings import PredictorProtocol
from lmserve_core.tasks import Task

__all__ = ["TritonEncoder", "load_triton_encoder"]

logger = logging.getLogger(__name__)

NETWORK_TIMEOUT_S = 60.0
HEALTH_INTERVAL_S = 2.0
# Batches on the wire at once: Triton computes one while the next travels.
CONCURRENT_BATCHES = 4
_NUMPY = {"INT64": np.int64, "INT32": np.int32}


@dataclass(frozen=True)
class PredictorTensor:
    name: str
    datatype: str


class TritonEncoder:
    """lmserve_core's ``EncoderBackend`` over a Triton model (thread-safe: a client per thread)."""

    def __init__(
        self,
        *,
        url: str,
        protocol: PredictorProtocol,
        model_name: str,
        inputs: Sequence[PredictorTensor],
        output: str,
        ssl: bool = False,
    ) -> None:
        self.url = url
        self.protocol = protocol
        self.model_name = model_name
        self.inputs = tuple(inputs)
        self.output = output
        self.ssl = ssl
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._unhealthy: str | None = None
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None

    # --- clients ------------------------------------------------------------------
    @property
    def _grpc(self) -> bool:
        return self.protocol is PredictorProtocol.grpc_v2

    def _module(self) -> Any:
        if self._grpc:
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def client(self) -> Any:
        """This thread's client: tritonclient's HTTP client is not thread-safe."""
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._module()
            if self._grpc:
                client = module.InferenceServerClient(url=self.url, ssl=self.ssl)
            else:
                client = module.InferenceServerClient(
                    url=self.url, ssl=self.ssl,
                    connection_timeout=NETWORK_TIMEOUT_S, network_timeout=NETWORK_TIMEOUT_S,
                )  # fmt: skip
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    # --- EncoderBackend -------------------------------------------------------------
    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        module = self._module()
        tensors = []
        for spec in self.inputs:
            array = inputs.get(spec.name)
            if array is None:  # token_type_ids of single sentences: all zeros
                array = np.zeros_like(inputs["input_ids"])
            tensor = module.InferInput(spec.name, list(array.shape), spec.datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=_NUMPY[spec.datatype]))
            tensors.append(tensor)
        requested = [module.InferRequestedOutput(self.output)]
        kwargs: dict[str, Any] = {"client_timeout": NETWORK_TIMEOUT_S} if self._grpc else {}
        try:
            result = self.client().infer(self.model_name, tensors, outputs=requested, **kwargs)
        except Exception as exc:
            raise self.predictor_error(exc) from exc
        self._unhealthy = None
        data = result.as_numpy(self.output)
        if data is None:
            raise PredictorError(f"Triton returned no {self.output!r} output")
        return np.asarray(data, dtype=np.float32)

    @property
    def health_problem(self) -> str | None:
        """Why the predictor cannot serve now, or None."""
        return self._unhealthy

    def check_health(self) -> None:
        if self._unhealthy is not None:
            raise ModelNotReady(self._unhealthy)

    def close(self) -> None:
        self._closed.set()
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # closing a broken connection: nothing left to do
                logger.debug("closing a Triton client failed", exc_info=True)

    # --- health ---------------------------------------------------------------------
    def probe(self) -> str | None:
        """Ask Triton whether the model is ready; returns why not, or None when it is."""
        try:
            client = self.client()
            if not client.is_model_ready(self.model_name):
                return f"Triton at {self.url} has no ready model {self.model_name!r}"
        except Exception as exc:
            return self.predictor_error(exc).message
        return None

    def start_probing(self, interval: float = HEALTH_INTERVAL_S) -> None:
        """Readiness follows the predictor: a daemon thread re-checks it every ``interval``."""
        self._unhealthy = self.probe()

        def run() -> None:
            while not self._closed.wait(interval):
                self._unhealthy = self.probe()

        self._prober = threading.Thread(target=run, name="lmserve-triton-health", daemon=True)
        self._prober.start()

    def predictor_error(self, exc: Exception) -> PredictorError:
        """The error a client sees for a failed call; notes an unreachable predictor."""
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, InferenceServerException):
            message = exc.message() or str(exc)
            status = str(exc.status() or "")
            if "UNAVAILABLE" in status or "DEADLINE" in status:  # gRPC: no answer at all
                self._unhealthy = f"Triton at {self.url} cannot be reached: {message}"
                return PredictorError(self._unhealthy)
            return PredictorError(f"Triton: {message}")
        # Connection refused, reset, DNS, timeouts: the HTTP client raises plain OS errors.
        why = f"Triton at {self.url} cannot be reached: {type(exc).__name__}: {exc}"
        self._unhealthy = why
        return PredictorError(why)


# --- loading ----------------------------------------------------------------------------


def split_predictor_host(host: str) -> tuple[str, bool]:
    """``HOST:PORT`` (an ``http://`` or ``https://`` prefix is accepted) → (url, ssl)."""
    ssl = host.startswith(("https://", "grpcs://"))
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    host = host.rstrip("/")
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit() or "/" in host:
        raise ConfigurationError(
            f"--predictor_host must be HOST:PORT, not {host!r}", param="predictor_host"
        )
    return host, ssl


def _check_metadata(encoder: TritonEncoder, task: Task) -> None:
    """Compare Triton's view of the model with what will be sent; adopt its datatypes and
    output name. An unreachable predictor is not an error here: it may start later."""
    try:
        metadata = encoder.client().get_model_metadata(encoder.model_name)
    except Exception as exc:
        logger.warning(
            "cannot read the metadata of %r from Triton at %s yet (%s); sending %s",
            encoder.model_name, encoder.url, encoder.predictor_error(exc).message,
            ", ".join(t.name for t in encoder.inputs),
        )  # fmt: skip
        return
    remote_inputs = {name: dtype for name, dtype in _tensors(metadata, "inputs")}
    remote_outputs = [name for name, _ in _tensors(metadata, "outputs")]
    missing = [t.name for t in encoder.inputs if t.name not in remote_inputs]
    extra = [name for name in remote_inputs if name not in {t.name for t in encoder.inputs}]
    if missing or extra:
        raise ConfigurationError(
            f"Triton model {encoder.model_name!r} takes inputs {sorted(remote_inputs)}, but "
            f"--tensor_input_names sends {[t.name for t in encoder.inputs]}",
            param="tensor_input_names",
        )
    unsupported = {n: d for n, d in remote_inputs.items() if d not in _NUMPY}
    if unsupported:
        raise ConfigurationError(
            f"Triton model {encoder.model_name!r} wants {unsupported}; lmserve sends token "
            "ids as INT64 or INT32", param="tensor_input_names",
        )  # fmt: skip
    encoder.inputs = tuple(PredictorTensor(t.name, remote_inputs[t.name]) for t in encoder.inputs)
    expected = ENCODER_TASKS[task].model_output
    if expected not in remote_outputs:
        if len(remote_outputs) != 1:
            raise ConfigurationError(
                f"Triton model {encoder.model_name!r} has outputs {remote_outputs}; "
                f"{task.value} needs {expected!r}", param="predictor_host",
            )  # fmt: skip
        logger.info("using Triton output %r as %s", remote_outputs[0], expected)
        encoder.output = remote_outputs[0]


def _tensors(metadata: Any, key: str) -> list[tuple[str, str]]:
    """(name, datatype) pairs from either client's metadata (a dict over HTTP, a proto over gRPC)."""
    items = metadata.get(key, []) if isinstance(metadata, dict) else getattr(metadata, key)
    return [
        (str(i["name"]), str(i["datatype"])) if isinstance(i, dict) else (i.name, i.datatype)
        for i in items
    ]


def load_triton_encoder(request: LoadRequest) -> LoadedEncoder:
    settings, source, task = request.settings, request.source, request.task
    if task not in ENCODER_TASKS:
        raise ConfigurationError(
            f"--predictor_host serves encoder tasks; {task.value} is not one", param="task"
        )
    if not settings.predictor_host:
        raise ConfigurationError("transformer mode needs --predictor_host", param="predictor_host")
    started = time.perf_counter()
    url, ssl = split_predictor_host(settings.predictor_host)
    parts = graph_encoder_parts(request)
    names, info = parts.input_names, parts.info
    encoder = TritonEncoder(
        url=url,
        protocol=settings.predictor_protocol,
        model_name=settings.model_name,
        inputs=[PredictorTensor(name, "INT64") for name in names],
        output=ENCODER_TASKS[task].model_output,
        ssl=ssl,
    )
    _check_metadata(encoder, task)
    encoder.start_probing()
    problem = encoder.health_problem
    state = "ready" if problem is None else f"not ready ({problem})"
    logger.info(
        "transformer mode for %s (%s): tokenizer loaded in %.1f s, max_length %d; sending %s "
        "to Triton model %r at %s over %s, predictor %s",
        source.display_name, task.value, time.perf_counter() - started, info.max_length,
        ", ".join(f"{t.name} {t.datatype}" for t in encoder.inputs), encoder.model_name, url,
        settings.predictor_protocol.value, state,
    )  # fmt: skip
    return LoadedEncoder(
        backend=encoder,
        tokenizer=parts.tokenizer,
        info=info,
        options=parts.options,
        backend_name="triton",
        details={
            "predictor": url,
            "predictor_protocol": settings.predictor_protocol.value,
            "predictor_model": encoder.model_name,
            "predictor_inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": [-1, -1]} for t in encoder.inputs
            ],
            "predictor_output": encoder.output,
        },
        bucket_lengths=True,
        concurrent_batches=CONCURRENT_BATCHES,
    )
