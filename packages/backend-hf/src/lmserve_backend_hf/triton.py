"""Transformer mode (docs/behaviour.md §6): tokenize here, run the model on a Triton server.

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

The tensors sent and expected (``triton_contract``: names, Triton datatypes, shapes with the
batch axis) are shown in ``GET /v2/models/{name}`` as ``parameters.predictor_inputs`` and
``predictor_outputs``. When Triton answers at startup its model metadata is compared with them
and a mismatch stops startup naming both sides; an output of another shape at request time
(a model swapped behind a running transformer) is a 502 that says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmserve_backend_hf.encoder_info import graph_encoder_parts
from lmserve_backend_hf.triton_contract import (
    DYNAMIC,
    TritonTensor,
    describe_tensors,
    expected_output,
    reranker_graph_parts,
    token_inputs,
)
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
# Output datatypes lmserve reads (as float32): what an exporter may write for logits.
_FLOAT_OUTPUTS = ("FP32", "FP16", "FP64")


class TritonEncoder:
    """lmserve_core's ``EncoderBackend`` over a Triton model (thread-safe: a client per thread)."""

    def __init__(
        self,
        *,
        url: str,
        protocol: PredictorProtocol,
        model_name: str,
        inputs: Sequence[TritonTensor],
        output: TritonTensor,
        ssl: bool = False,
    ) -> None:
        self.url = url
        self.protocol = protocol
        self.model_name = model_name
        self.inputs = tuple(inputs)
        self.expected_output = output  # name, datatype, shape with the batch axis
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

    @property
    def output(self) -> str:
        return self.expected_output.name

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
        self._check_output_shape(data.shape)
        return np.asarray(data, dtype=np.float32)

    def _check_output_shape(self, shape: tuple[int, ...]) -> None:
        """Rank and every fixed axis as expected: post-processing would misread anything else."""
        want = self.expected_output.shape
        if not _compatible(shape, want):
            raise PredictorError(
                f"Triton model {self.model_name!r} returned {self.output!r} of shape "
                f"{list(shape)}; lmserve expects {list(want)} (-1 = any; see "
                f"predictor_outputs in GET /v2/models/{self.model_name})"
            )

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
    """``HOST:PORT`` (an ``http://`` or ``https://`` prefix is accepted) → (url, ssl).

    A bare ``HOST`` means port 80 (443 with ``https://``): KServe passes its transformer
    ``--predictor_host NAME-predictor.NAMESPACE``, the predictor's Service, which listens
    on 80, and its own transformers add that port the same way.
    """
    ssl = host.startswith(("https://", "grpcs://"))
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    host = host.rstrip("/")
    if host and ":" not in host and "/" not in host:
        host = f"{host}:{443 if ssl else 80}"
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit() or "/" in host:
        raise ConfigurationError(
            f"--predictor_host must be HOST:PORT (or HOST for port 80), not {host!r}",
            param="predictor_host",
        )
    return host, ssl


def _check_metadata(encoder: TritonEncoder, task: Task) -> None:
    """Compare Triton's view of the model with what will be sent and read; adopt its
    datatypes and output name. An unreachable predictor is not an error here: it may start
    later (then requests find out, as 502s carrying Triton's message)."""
    try:
        metadata = encoder.client().get_model_metadata(encoder.model_name)
    except Exception as exc:
        logger.warning(
            "cannot read the metadata of %r from Triton at %s yet (%s); sending %s",
            encoder.model_name, encoder.url, encoder.predictor_error(exc).message,
            ", ".join(t.describe() for t in encoder.inputs),
        )  # fmt: skip
        return
    model = encoder.model_name
    remote_inputs = {t.name: t for t in _tensors(metadata, "inputs")}
    remote_outputs = _tensors(metadata, "outputs")
    missing = [t.name for t in encoder.inputs if t.name not in remote_inputs]
    extra = [name for name in remote_inputs if name not in {t.name for t in encoder.inputs}]
    if missing or extra:
        raise ConfigurationError(
            f"Triton model {model!r} takes inputs {sorted(remote_inputs)}, but "
            f"--tensor_input_names sends {[t.name for t in encoder.inputs]}",
            param="tensor_input_names",
        )
    unsupported = {n: t.datatype for n, t in remote_inputs.items() if t.datatype not in _NUMPY}
    if unsupported:
        raise ConfigurationError(
            f"Triton model {model!r} wants {unsupported}; lmserve sends token "
            "ids as INT64 or INT32", param="tensor_input_names",
        )  # fmt: skip
    fixed = {n: list(t.shape) for n, t in remote_inputs.items() if not _accepts(t.shape)}
    if fixed:
        raise ConfigurationError(
            f"Triton model {model!r} takes inputs of shape {fixed}; lmserve sends "
            "[batch, padded length] with both axes dynamic ([-1, -1]): config.pbtxt needs "
            "max_batch_size > 0 and dims [ -1 ] (what lmserve export writes)",
            param="tensor_input_names",
        )  # fmt: skip
    encoder.inputs = tuple(
        TritonTensor(t.name, remote_inputs[t.name].datatype, t.shape) for t in encoder.inputs
    )

    want = encoder.expected_output
    named = [t for t in remote_outputs if t.name == want.name]
    if not named:
        if len(remote_outputs) != 1:
            raise ConfigurationError(
                f"Triton model {model!r} has outputs {[t.name for t in remote_outputs]}; "
                f"{task.value} needs {want.name!r}", param="predictor_host",
            )  # fmt: skip
        logger.info("using Triton output %r as %s", remote_outputs[0].name, want.name)
    got = named[0] if named else remote_outputs[0]
    if got.datatype not in _FLOAT_OUTPUTS:
        raise ConfigurationError(
            f"Triton model {model!r} returns {got.name} as {got.datatype}; lmserve reads "
            f"{task.value} output as floating point ({', '.join(_FLOAT_OUTPUTS)})",
            param="predictor_host",
        )
    if not _compatible(got.shape, want.shape):
        raise ConfigurationError(
            f"Triton model {model!r} returns {got.name} of shape {list(got.shape)}; lmserve "
            f"expects {list(want.shape)} for {task.value} (-1 = any; the last axis from "
            "this model's config.json): is --model_dir / --model_id the model Triton serves?",
            param="predictor_host",
        )
    encoder.expected_output = TritonTensor(got.name, got.datatype, want.shape)


def _accepts(shape: Sequence[int]) -> bool:
    """A Triton input shape that takes lmserve's [batch, padded length] of any size."""
    return len(shape) == 2 and all(d == DYNAMIC for d in shape)


def _compatible(remote: Sequence[int], expected: Sequence[int]) -> bool:
    """Same rank, and axes fixed on both sides agree."""
    return len(remote) == len(expected) and all(
        DYNAMIC in (r, e) or r == e for r, e in zip(remote, expected, strict=True)
    )


def _tensors(metadata: Any, key: str) -> list[TritonTensor]:
    """Tensors from either client's metadata (a dict over HTTP, a proto over gRPC)."""
    items = metadata.get(key, []) if isinstance(metadata, dict) else getattr(metadata, key)
    return [
        TritonTensor(str(i["name"]), str(i["datatype"]), tuple(int(d) for d in i.get("shape", ())))
        if isinstance(i, dict)
        else TritonTensor(i.name, i.datatype, tuple(int(d) for d in i.shape))
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
    if task is Task.rerank:  # a BERT cross-encoder's graph takes token types
        parts = reranker_graph_parts(parts, request.config, source.display_name,
                                     names_given=bool(settings.tensor_input_name_list))  # fmt: skip
    names, info = parts.input_names, parts.info
    encoder = TritonEncoder(
        url=url,
        protocol=settings.predictor_protocol,
        model_name=settings.model_name,
        inputs=token_inputs(names),
        output=expected_output(task, info, ENCODER_TASKS[task].model_output),
        ssl=ssl,
    )
    _check_metadata(encoder, task)
    encoder.start_probing()
    problem = encoder.health_problem
    state = "ready" if problem is None else f"not ready ({problem})"
    logger.info(
        "transformer mode for %s (%s): tokenizer loaded in %.1f s, max_length %d; Triton model "
        "%r at %s over %s, predictor %s; tensors:\n  %s",
        source.display_name, task.value, time.perf_counter() - started, info.max_length,
        encoder.model_name, url, settings.predictor_protocol.value, state,
        "\n  ".join(describe_tensors(encoder.inputs, [encoder.expected_output])),
    )  # fmt: skip
    return LoadedEncoder(
        backend=encoder,
        tokenizer=parts.tokenizer,
        info=info,
        options=parts.options,
        details={
            "predictor": url,
            "predictor_protocol": settings.predictor_protocol.value,
            "predictor_model": encoder.model_name,
            # What lmserve sends to and expects from Triton, in Triton's own model-metadata
            # form (datatype names, shapes with the batch axis): config.pbtxt's dims are
            # these shapes without their first axis when max_batch_size > 0.
            "predictor_inputs": [t.as_dict() for t in encoder.inputs],
            "predictor_outputs": [encoder.expected_output.as_dict()],
        },
        bucket_lengths=True,
        concurrent_batches=CONCURRENT_BATCHES,
    )
