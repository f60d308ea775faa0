"""``/metrics`` with ``--api_workers``: any worker answers with every worker's series added up.

Each worker keeps its own registry (the same series, names and labels as one process) and
answers its own page on a private IPC socket from a small thread; the worker a scrape reaches
asks the others and adds the pages up. Prometheus' multiprocess mode was the alternative: it
cannot add up the collectors read at scrape time (the admission gate's gauges) and gives
gauges a ``pid`` label, which would change the series.

Counters, histograms and gauges are summed across workers, except ``lmserve_model_ready``,
which is the lowest (1 only when every worker can serve); ``_created`` is the earliest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0
_LOWEST = frozenset({"lmserve_model_ready"})


def metrics_endpoint(workdir: Path, index: int) -> str:
    """Worker ``index``'s page socket in the server's private directory."""
    return f"ipc://{workdir / f'metrics-{index}'}"


def merge_pages(pages: Sequence[bytes]) -> bytes:
    """Prometheus text pages of the same registry layout, added up into one page."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for page in pages:
        for family in text_string_to_metric_families(page.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif family.name in _LOWEST or sample.name.endswith("_created"):
                    merged[key] = min(merged[key], sample.value)
                else:
                    merged[key] += sample.value
    for name, family in families.items():
        family.samples = [Sample(s, dict(labels), v) for (s, labels), v in values[name].items()]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return bytes(generate_latest(registry))


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class PageServer:
    """Answers this worker's own page to the other workers (a daemon thread)."""

    def __init__(self, render: Callable[[], bytes], endpoint: str) -> None:
        self.render = render
        self.endpoint = endpoint
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)

    def start(self) -> None:
        self._socket.bind(self.endpoint)
        threading.Thread(target=self._run, name="lmserve-metrics-page", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                self._socket.recv()
                try:
                    page = self.render()
                except Exception:  # a broken page must not stop the others' scrapes
                    logger.exception("rendering this worker's metrics failed")
                    page = b""
                self._socket.send(page)
        except zmq.ZMQError:  # the context terminated: the worker is stopping
            self._socket.close(linger=0)

    def close(self) -> None:
        # term() wakes the thread's recv with an error; it closes the socket, term returns.
        self._context.term()


async def gather_pages(own: bytes, endpoints: Sequence[str]) -> bytes:
    """This worker's page plus the others' (at ``endpoints``), added up. A worker that does
    not answer in time is left out, with a warning: its own supervisor reports it."""
    context = zmq.asyncio.Context.instance()
    pages = [own]
    for endpoint in endpoints:
        sock = context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            await sock.send(b"")
            if await sock.poll(int(SCRAPE_TIMEOUT_S * 1000)):  # POLLIN: an answer waits
                pages.append(await sock.recv())
            else:
                logger.warning("API worker metrics at %s did not answer in time", endpoint)
        finally:
            sock.close(linger=0)
    return merge_pages(pages)
