"""Request logs, x-request-id and Prometheus metrics on real servers (issue 8, docs/behaviour.md §8)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import httpx
import pytest

from _support.sdk import openai_client
from _support.servers import ServerProcess
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")


def samples(server: ServerProcess) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            out.append((match["name"], labels, float(match["value"])))
    return out


def value(server: ServerProcess, name: str, **labels: str) -> float:
    return sum(v for n, ls, v in samples(server) if n == name and labels.items() <= ls.items())


def log_lines(server: ServerProcess, needle: str, timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in server.log().splitlines() if needle in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture(scope="module")
def json_encoder(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("sentiment")), "--log_format", "json",
                       "--log_requests")  # fmt: skip


@pytest.fixture(scope="module")
def generator(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")


def test_request_id_is_honoured_echoed_and_logged_as_json(json_encoder: ServerProcess) -> None:
    r = httpx.post(json_encoder.url + "/v1/models/model:predict", headers={"x-request-id": "abc-123"},
                   json={"instances": ["a wonderful film"]})  # fmt: skip
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    fresh = httpx.post(json_encoder.url + "/v1/models/model:predict", json={"instances": ["x"]})
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    # An insane id (too long) is replaced, not echoed.
    long = httpx.get(json_encoder.url + "/v2/health/ready", headers={"x-request-id": "x" * 500})
    assert long.headers["x-request-id"] != "x" * 500
    (line,) = log_lines(json_encoder, '"abc-123"')
    entry = json.loads(line)
    assert entry["logger"] == "lmserve.access" and entry["level"] == "INFO"
    assert entry["route"] == "/v1/models/{model_name}:predict" and entry["model"] == "model"
    assert entry["status"] == 200 and entry["method"] == "POST" and entry["latency_ms"] > 0
    assert entry["prompt_tokens"] >= 3
    assert "a wonderful film" in entry["body"]  # --log_requests
    bad = httpx.post(json_encoder.url + "/v1/models/ghost:predict", json={"instances": ["x"]},
                     headers={"x-request-id": "req-404"})  # fmt: skip
    assert bad.status_code == 404
    assert json.loads(log_lines(json_encoder, '"req-404"')[0])["status"] == 404
    # Every line the server wrote is JSON (startup, model load, uvicorn, access).
    for text in json_encoder.log().splitlines():
        if text.strip():
            json.loads(text)
    # Probes are not logged at INFO.
    assert not [t for t in json_encoder.log().splitlines() if '"/v2/health/ready"' in t]


def test_encoder_metrics_follow_prometheus_conventions(json_encoder: ServerProcess) -> None:
    for _ in range(3):
        httpx.post(
            json_encoder.url + "/v1/models/model:predict", json={"instances": ["good", "bad"]}
        )
    route = "/v1/models/{model_name}:predict"
    assert value(json_encoder, "lmserve_requests_total", route=route, status="200") >= 3
    assert value(json_encoder, "lmserve_request_duration_seconds_count", route=route) >= 3
    assert value(json_encoder, "lmserve_queue_time_seconds_count") >= 3
    assert value(json_encoder, "lmserve_batch_size_sum") >= 6
    # Each of the three requests above ran in a batch with a forward pass, and each pass is
    # timed (a batch whose every input failed tokenizing would run none).
    assert value(json_encoder, "lmserve_forward_duration_seconds_count") >= 3
    model_seconds = value(json_encoder, "lmserve_forward_duration_seconds_sum")
    assert 0 < model_seconds < value(json_encoder, "lmserve_request_duration_seconds_sum")
    assert value(json_encoder, "lmserve_prompt_tokens_total") > 0
    assert value(json_encoder, "lmserve_requests_in_flight") == 0
    assert value(json_encoder, "lmserve_model_ready", model="model") == 1
    names = {n for n, _, _ in samples(json_encoder) if not n.startswith(("python_", "process_"))}
    for name in names:
        assert name.startswith("lmserve_"), name
        if "seconds" in name or "duration" in name or "latency" in name:
            assert re.search(r"_seconds(_bucket|_count|_sum|_created)?$", name), name
    text = httpx.get(json_encoder.url + "/metrics").text
    for counter in re.findall(r"^# TYPE (\S+) counter$", text, re.M):
        assert counter.endswith("_total"), counter


def test_generation_metrics_and_text_access_lines(generator: ServerProcess) -> None:
    c = openai_client(generator)
    before = value(generator, "lmserve_time_to_first_token_seconds_count")
    c.completions.create(model="model", prompt="Once", max_tokens=5, extra_body={"ignore_eos": True},
                         extra_headers={"x-request-id": "gen-plain"})  # fmt: skip
    stream = c.chat.completions.create(
        model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=7, stream=True,
        extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "gen-stream"},
    )  # fmt: skip
    assert len([ch for ch in stream if ch.choices and ch.choices[0].delta.content]) >= 1
    assert value(generator, "lmserve_time_to_first_token_seconds_count") == before + 2
    assert value(generator, "lmserve_inter_token_latency_seconds_count") >= 10
    assert value(generator, "lmserve_queue_time_seconds_count") >= 2
    assert value(generator, "lmserve_generation_tokens_total") >= 12
    assert value(generator, "lmserve_prompt_tokens_total") > 0
    (plain,) = log_lines(generator, "request_id=gen-plain")
    assert "route=/openai/v1/completions" in plain and "status=200" in plain
    assert "completion_tokens=5" in plain and "model=model" in plain
    (streamed,) = log_lines(generator, "request_id=gen-stream")
    assert "completion_tokens=7" in streamed  # counted at the stream's last byte
