"""Prometheus metrics: per-route counts and latencies by status, in-flight, batch sizes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmserve_core.admission import AdmissionGate

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmserve_requests", "HTTP requests by route, method and status",
            ["route", "method", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "lmserve_request_duration_seconds", "HTTP request latency by route and status",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "lmserve_requests_in_flight", "HTTP requests being served", registry=self.registry
        )
        self.batch_size = Histogram(
            "lmserve_batch_size", "Instances per model forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )  # fmt: skip
        self.input_tokens = Counter(
            "lmserve_prompt_tokens", "Input tokens processed", registry=self.registry
        )
        self.queue_time_seconds = Histogram(
            "lmserve_queue_time_seconds",
            "Time a request waited before the model took it (encoder batch or generation engine)",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "lmserve_time_to_first_token_seconds", "Time from request to first generated token",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "lmserve_inter_token_latency_seconds", "Time between generated tokens",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            "lmserve_generation_tokens", "Tokens generated", registry=self.registry
        )
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

    def decode_step(self, sequences: int) -> None:
        self.decode_batch_size.observe(sequences)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def queue_time(self, seconds: float) -> None:
        self.queue_time_seconds.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self.input_tokens.inc(prompt)
        self.generation_tokens.inc(generated)


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
