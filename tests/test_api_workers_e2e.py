"""``--api_workers 2`` against real processes: the tiny sentiment BERT served by two HTTP
worker processes feeding the one process that holds the model (issue 20, item 2).

Same answers as one process on every protocol, both workers serving, /metrics adding up both,
the API key and body limit in each worker, a drain on SIGTERM with requests in flight, a dead
worker taking the server down, and the configurations it refuses.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient

from _support.servers import ServerProcess, free_port, start_server
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 20_000
TEXTS = ["I love this", "I hate this", "what a wonderful day", "this is terrible"]
PREDICT = "/v1/models/sentiment:predict"


def _args(workers: int, body_limit: int = BODY_LIMIT) -> list[str]:
    return ["--model_dir", str(model_path("sentiment")), "--model_name", "sentiment",
            "--api_workers", str(workers), "--api_key", KEY,
            "--max_request_body_bytes", str(body_limit)]  # fmt: skip


@pytest.fixture(scope="module")
def one() -> Iterator[ServerProcess]:
    server = start_server(_args(1))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two() -> Iterator[ServerProcess]:
    server = start_server(_args(2))
    yield server
    assert server.stop() == 0, server.log()[-3000:]


def _post(server: ServerProcess, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    """A new connection per request: the kernel picks the worker per connection."""
    kwargs.setdefault("headers", AUTH)
    kwargs.setdefault("timeout", 60)
    return httpx.post(server.url + path, json=body, **kwargs)


def _worker_lines(server: ServerProcess, status: int) -> dict[int, int]:
    """Access lines of ``PREDICT`` answered with ``status``, counted per worker."""
    counts: dict[int, int] = {}
    for match in re.finditer(
        rf"POST {re.escape(PREDICT)} {status} .* worker=(\d+)$", server.log(), re.M
    ):
        counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + 1
    return counts


def _spread(server: ServerProcess, body: Any, count: int, **kwargs: Any) -> list[int]:
    """``count`` requests, 8 at a time, each on its own connection: their status codes."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: _post(server, PREDICT, body, **kwargs).status_code,
                             range(count)))  # fmt: skip


def _predict_total(server: ServerProcess, status: int = 200) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    pattern = (rf'^lmserve_requests_total\{{[^}}]*route="/v1/models/{{model_name}}:predict"'
               rf'[^}}]*status="{status}"[^}}]*\}} ([0-9.e+]+)$')  # fmt: skip
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def _forward_passes(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.findall(r"^lmserve_forward_duration_seconds_count ([0-9.e+]+)$", text,
                            re.M)[0])  # fmt: skip


# --- same answers as one process --------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        (PREDICT, {"instances": TEXTS}),
        (PREDICT, {"instances": TEXTS, "parameters": {"output": "labels"}}),
        ("/v2/models/sentiment/infer",
         {"inputs": [{"name": "input-0", "shape": [4], "datatype": "BYTES", "data": TEXTS}]}),
        ("/tokenize", {"model": "sentiment", "prompt": "I love this"}),
    ],
)  # fmt: skip
def test_answers_match_one_process(
    one: ServerProcess, two: ServerProcess, path: str, body: dict[str, Any]
) -> None:
    a, b = _post(one, path, body), _post(two, path, body)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    ja, jb = a.json(), b.json()
    for answer in (ja, jb):
        answer.pop("id", None)
    assert ja == jb
    if path == PREDICT and "parameters" not in body:
        assert jb["predictions"] == [1, 0, 1, 0]  # the model's own answers, not just equal


def test_metadata_shows_the_owners_model(two: ServerProcess) -> None:
    meta = httpx.get(two.url + "/v2/models/sentiment", headers=AUTH, timeout=10).json()
    assert meta["parameters"]["api_workers"] == 2
    assert meta["parameters"]["device"] == "cpu"  # read from the process holding the weights
    assert meta["parameters"]["backend"] == "huggingface"


def test_only_the_owner_loads_torch(two: ServerProcess) -> None:
    """The workers load the tokenizer and model facts, never the weights (nor torch)."""
    with open(f"/proc/{two.proc.pid}/maps") as fh:
        assert "libtorch" in fh.read()
    for pid in _worker_pids(two):
        with open(f"/proc/{pid}/maps") as fh:
            assert "libtorch" not in fh.read()


def test_grpc_infer_matches(one: ServerProcess, two: ServerProcess) -> None:
    import numpy as np

    outputs = []
    for server in (one, two):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{_grpc_port(server)}")
        data = grpcclient.InferInput("input-0", [len(TEXTS)], "BYTES")
        data.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        result = client.infer("sentiment", [data], headers={"authorization": f"Bearer {KEY}"})
        outputs.append(result.as_numpy("output-0").tolist())
        client.close()
    assert outputs[0] == outputs[1] == [1, 0, 1, 0]


def _grpc_port(server: ServerProcess) -> str:
    """The port start_server chose (on the command line, not in ``server.args``)."""
    with open(f"/proc/{server.proc.pid}/cmdline", "rb") as fh:
        cmdline = fh.read().split(b"\0")
    return cmdline[cmdline.index(b"--grpc_port") + 1].decode()


def test_onnx_backend_behind_workers(one: ServerProcess) -> None:
    """ONNX Runtime in the owner (exported once, cached), the workers as with torch."""
    server = start_server([*_args(2), "--backend", "onnx", "--enable_grpc", "false"])
    try:
        for body in (
            {"instances": TEXTS},
            {"instances": TEXTS, "parameters": {"output": "labels"}},
        ):
            a, b = _post(one, PREDICT, body), _post(server, PREDICT, body)
            assert b.status_code == 200, b.text
            if "parameters" in body:  # float32 both; scores agree to the 4th decimal
                for x, y in zip(a.json()["predictions"], b.json()["predictions"], strict=True):
                    assert x[0]["label"] == y[0]["label"]
                    assert x[0]["score"] == pytest.approx(y[0]["score"], abs=1e-4)
            else:
                assert a.json() == b.json() == {"predictions": [1, 0, 1, 0]}
        meta = httpx.get(server.url + "/v2/models/sentiment", headers=AUTH, timeout=10).json()
        assert meta["parameters"]["backend"] == "onnx" and "providers" in meta["parameters"]
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def _close(a: Any, b: Any) -> bool:
    """The same JSON, floats within 1e-5."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_per_token_outputs_survive_merged_passes() -> None:
    """NER under concurrent load (both workers' batches share passes in the model's process,
    padded to the longest): every answer equals the one the same text gets alone."""
    server = start_server(["--model_dir", str(model_path("ner")), "--model_name", "ner",
                           "--api_workers", "2", "--enable_grpc", "false"])  # fmt: skip
    texts = ["Alice lives in Paris", "Alice works at Google in Paris today", "Paris",
             "Google hired Alice and Bob in Paris and in Berlin last year"]  # fmt: skip
    path = "/v1/models/ner:predict"
    try:
        bodies = [{"instances": [t]} for t in texts]
        bodies += [{"instances": [t], "parameters": {"output": "labels"}} for t in texts]
        alone = [_post(server, path, b, headers={}).json() for b in bodies]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda i: _post(server, path, bodies[i % len(bodies)],
                                                     headers={}).json(), range(48)))  # fmt: skip
        for i, answer in enumerate(together):
            # Scores move in the 7th digit with the batch a row runs in (one process too).
            assert _close(answer, alone[i % len(bodies)]), (bodies[i % len(bodies)], answer)
        assert alone[0]["predictions"][0][0][1] != 0  # "Alice": an entity, not all "O"
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# --- both workers, one set of metrics ---------------------------------------------------


def test_both_workers_serve_and_metrics_add_up(two: ServerProcess) -> None:
    before, passes_before = _predict_total(two), _forward_passes(two)
    statuses = _spread(two, {"instances": ["I love this"]}, 60)
    assert statuses == [200] * 60
    served = _worker_lines(two, 200)
    assert set(served) == {0, 1}, served  # the access log says which worker answered
    # Any worker's /metrics counts every worker's requests: scrape several times, over new
    # connections (each may land on either worker), and always see all 60.
    totals = {_predict_total(two) - before for _ in range(6)}
    assert totals == {60.0}
    # Each worker times its calls to the model's process; batches may merge, never split.
    assert 1 <= _forward_passes(two) - passes_before <= 60


# --- limits and the API key in every worker ---------------------------------------------


def test_api_key_is_required_by_every_worker(two: ServerProcess) -> None:
    statuses = _spread(two, {"instances": ["I love this"]}, 40, headers={})
    assert statuses == [401] * 40
    assert set(_worker_lines(two, 401)) == {0, 1}
    assert _post(two, PREDICT, {"instances": ["x"]}, headers={"Authorization": "Bearer no"}
                 ).status_code == 401  # fmt: skip
    # Health and metrics stay open, as with one process.
    assert httpx.get(two.url + "/v2/health/ready", timeout=10).status_code == 200


def test_body_over_the_limit_gets_413(two: ServerProcess) -> None:
    big = {"instances": ["love " * (BODY_LIMIT // 5)]}
    statuses = _spread(two, big, 16)
    assert statuses == [413] * 16
    assert set(_worker_lines(two, 413)) == {0, 1}


def test_instances_limit_is_a_400(two: ServerProcess) -> None:
    r = _post(two, PREDICT, {"instances": ["a"] * 1025})
    assert r.status_code == 400 and "--max_instances_per_request" in r.text


# --- shutdown and failures --------------------------------------------------------------


def _worker_pids(server: ServerProcess, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"through 2 API workers \(pids (\d+), (\d+)\)", server.log())
        if match:
            return [int(match.group(1)), int(match.group(2))]
        time.sleep(0.1)
    raise AssertionError(server.log()[-3000:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False


def test_sigterm_lets_requests_in_flight_finish_then_exits_0() -> None:
    server = start_server(_args(2, body_limit=16 * 1024 * 1024))
    pids = _worker_pids(server)
    heavy = {"instances": ["what a wonderful day and I love this " * 6] * 1000}
    results: list[tuple[float, int | str]] = []
    signalled = threading.Event()

    def client() -> None:
        while not signalled.is_set():
            started = time.monotonic()
            try:
                status: int | str = _post(server, PREDICT, heavy, timeout=120).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            results.append((started, status))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # heavy requests are now running in both workers
    sent_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    signalled.set()
    # While the workers drain, readiness is 503 in each (then the listeners close).
    ready: list[int | str] = []
    while any(thread.is_alive() for thread in threads) and len(ready) < 40:
        try:
            ready.append(httpx.get(server.url + "/v2/health/ready", timeout=5).status_code)
        except httpx.HTTPError as exc:
            ready.append(type(exc).__name__)
        time.sleep(0.05)
    for thread in threads:
        thread.join(120)
    assert server.proc.wait(60) == 0, server.log()[-3000:]
    log = server.log()
    assert "stopping: draining 2 API workers" in log
    # The drain found requests in flight and they were answered, not cut.
    assert re.search(r"[1-9]\d* request\(s\) in flight get up to", log), log[-3000:]
    # Sent a second or more before the signal: answered, or (not yet admitted: on a loaded
    # machine a 1000-instance body can still be uploading or tokenizing when the drain
    # starts) refused with 503, as with one process; never a cut connection.
    in_flight = [status for started, status in results if started < sent_at - 1.0]
    assert 200 in in_flight and all(status in (200, 503) for status in in_flight), results
    # The rest are answered or refused with 503 (or find the listener closed), never a 500.
    late = [status for started, status in results if started >= sent_at - 1.0]
    assert all(status in (200, 503) or isinstance(status, str) for status in late), late
    # (A probe may beat the signal's way from the owner to a worker: skip a leading 200.)
    after = ready[next((i for i, r in enumerate(ready) if r != 200), len(ready)) :]
    assert 503 in after and 200 not in after, ready
    assert not any(_alive(pid) for pid in pids)


def test_a_dead_worker_stops_the_server_non_zero() -> None:
    server = start_server(_args(2))
    pids = _worker_pids(server)
    os.kill(pids[1], signal.SIGKILL)
    code = server.proc.wait(60)
    assert code == 1, server.log()[-3000:]
    assert re.search(rf"API worker 1 \(pid {pids[1]}\) exited with code -9", server.log())
    assert not _alive(pids[0])


def test_workers_of_a_killed_owner_stop() -> None:
    """No orphans serving 503s forever: the workers notice the owner is gone and exit."""
    server = start_server(_args(2))
    pids = _worker_pids(server)
    server.proc.kill()
    server.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), server.log()[-3000:]
    assert "the model process (pid" in server.log()


def test_a_grpc_port_in_use_exits_2_naming_it() -> None:
    """Worker 0 cannot listen for gRPC: it exits 2, and so does the whole server."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "lmserve_server", *_args(2), "--http_port", str(free_port()),
             "--grpc_port", str(port)],
            capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--grpc_port" in r.stderr and "API worker 0" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize(
    "extra, why",
    [
        (["--model_dir", "{llama}"], "text_generation is generative"),
        (["--model_dir", "{sentiment}", "--predictor_host", "127.0.0.1:1"], "--predictor_host"),
        (["--model_dir", "{sentiment}", "--enable_lora"], "LoRA"),
    ],
)
def test_refused_configurations_exit_2_naming_the_flag(extra: list[str], why: str) -> None:
    paths = {"llama": str(model_path("llama")), "sentiment": str(model_path("sentiment"))}
    args = [a.format(**paths) for a in extra]
    r = subprocess.run(
        [sys.executable, "-m", "lmserve_server", *args, "--api_workers", "2"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--api_workers 2" in r.stderr and why in r.stderr, r.stderr[-2000:]


def test_help_documents_the_flag() -> None:
    r = subprocess.run([sys.executable, "-m", "lmserve_server", "--help"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    text = " ".join(r.stdout.split())
    assert "--api_workers" in text and "--api-workers" in text
    assert "refused at start" in text
