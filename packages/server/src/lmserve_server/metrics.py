"""Prometheus metrics: per-route counts and latencies by status, in-flight, batch sizes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmserve_core.admission import AdmissionGate

# A tiny encoder's pass takes under a millisecond on a CPU, a GPU's less.
FORWARD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several apps (tests) never collide.

    Request, token and latency series carry a ``model`` label: the served name a request ran
    under (the base model's primary name, or a LoRA adapter's), "" for requests that named no
    served model (health, metadata of unknown names): the label's values stay bounded by what
    is served.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The served name for a requested one ("" when it names nothing served); the app sets
        # it to its model host's.
        self.served_name: Callable[[str | None], str] = lambda name: ""
        self.default_model = ""  # the base model's primary name (the app sets it)
        self.requests = Counter(
            "lmserve_requests", "HTTP requests by route, method, status and served model",
            ["route", "method", "status", "model"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "lmserve_request_duration_seconds",
            "HTTP request latency by route, status and served model",
            ["route", "method", "status", "model"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "lmserve_requests_in_flight", "HTTP requests being served", registry=self.registry
        )
        self.batch_size = Histogram(
            "lmserve_batch_size", "Instances per model forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )  # fmt: skip
        self.forward_duration = Histogram(
            "lmserve_forward_duration_seconds",
            "Seconds one encoder forward pass took: in the model, or the call to the model's "
            "process (--api_workers) or to Triton (--predictor_host); a batch may run as several "
            "length-sorted passes", buckets=FORWARD_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.input_tokens = Counter(
            "lmserve_prompt_tokens", "Input tokens processed, by served model", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.queue_time_seconds = Histogram(
            "lmserve_queue_time_seconds",
            "Time a request waited before the model took it (encoder batch or generation engine)",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "lmserve_time_to_first_token_seconds", "Time from request to first generated token",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "lmserve_inter_token_latency_seconds", "Time between generated tokens",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            "lmserve_generation_tokens", "Tokens generated, by served model", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.decode_batch_size = Histogram(
            "lmserve_decode_batch_size", "Sequences per generation forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )  # fmt: skip
        self.sequences_unfinished = Gauge(
            "lmserve_generation_sequences_unfinished",
            "Sequences being generated or waiting in the engine", registry=self.registry,
        )  # fmt: skip
        self.model_ready = Gauge(
            "lmserve_model_ready", "1 when the model is loaded and healthy", ["model"],
            registry=self.registry,
        )  # fmt: skip

    # ServingObserver (lmserve_core.observer)
    def batch(self, instances: int) -> None:
        self.batch_size.observe(instances)

    def forward_pass(self, seconds: float) -> None:
        self.forward_duration.observe(seconds)

    def decode_step(self, sequences: int) -> None:
        self.decode_batch_size.observe(sequences)

    def first_token(self, seconds: float, *, model: str | None = None) -> None:
        self.time_to_first_token.labels(model or self.default_model).observe(seconds)

    def queue_time(self, seconds: float, *, model: str | None = None) -> None:
        self.queue_time_seconds.labels(model or self.default_model).observe(seconds)

    def inter_token(self, seconds: float, *, model: str | None = None) -> None:
        self.inter_token_latency.labels(model or self.default_model).observe(seconds)

    def tokens(self, prompt: int, generated: int, *, model: str | None = None) -> None:
        label = model or self.default_model
        self.input_tokens.labels(label).inc(prompt)
        self.generation_tokens.labels(label).inc(generated)


class AdmissionCollector(Collector):
    """The admission gate's counts, read at scrape time (core keeps no Prometheus objects)."""

    def __init__(self, gate: AdmissionGate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "lmserve_admitted_requests",
            "Requests holding an admission slot, running or queued (see --max_queued_requests)",
            value=self.gate.requests,
        )
        yield GaugeMetricFamily(
            "lmserve_queued_work", "Units of work waiting beyond those running",
            value=self.gate.queued,
        )  # fmt: skip
        yield CounterMetricFamily(
            "lmserve_rejected_requests", "Requests refused with 429 because the queue was full",
            value=self.gate.rejected,
        )  # fmt: skip
