"""LoRA adapters through real servers and real clients, on both backends (issue 18).

Two tiny adapters trained with PEFT on the suite's tiny Llama (``_support.lora_adapters``) change
its answer to one question ("Paris." -> "Rome." / "Tokyo."). Served as a KServe manifest would
start ``vllm serve`` (``--enable-lora --lora-modules ...``), the base answers as the base and each
adapter as itself while their requests run concurrently; runtime loads and unloads take vLLM's
bodies; every bad adapter is a clear 4xx and the server keeps serving the others. vLLM's own
server, given the same adapters, is the reference for the model list and the update routes.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from _support.lora_adapters import (
    ANSWERS,
    COMPLETION_PROMPT,
    COMPLETIONS,
    QUESTION,
    SENTIMENT_ADAPTER,
    SENTIMENT_FLIP,
    adapter_path,
    bad_adapter,
    sentiment_adapter_path,
)
from _support.sdk import openai_client
from _support.servers import ServerProcess, start_server
from _support.tiny_models import SENTIMENT_LABELS, model_path
from _support.vllm_reference import start_vllm_reference

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]

ROME, TOKYO = "capital-rome", "capital-tokyo"
BACKENDS = {
    "vllm": ("--backend", "vllm", "--kv-cache-memory-bytes", str(512 * 2**20)),
    "huggingface": ("--backend", "huggingface"),
}


def lora_args() -> tuple[str, ...]:
    """vLLM's flags in both --lora-modules forms, as a KServe manifest carries them."""
    tokyo = json.dumps(
        {"name": TOKYO, "path": str(adapter_path(TOKYO)), "base_model_name": "model"}
    )
    return ("--enable-lora", "--max-loras", "2", "--lora-modules",
            f"{ROME}={adapter_path(ROME)}", tokyo)  # fmt: skip


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def server(request: pytest.FixtureRequest, server_pool: Pool) -> ServerProcess:
    return server_pool(
        "--model_dir", str(model_path("llama")), *BACKENDS[request.param], *lora_args(),
        "--enable_lora_runtime_updates",
    )  # fmt: skip


def ask(server: ServerProcess, model: str, *, stream: bool = False) -> str:
    """The France question to ``model`` through the openai SDK, greedy."""
    client = openai_client(server, timeout=180)
    messages: Any = [{"role": "user", "content": QUESTION}]
    if not stream:
        r = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=12
        )
        assert r.model == model
        return r.choices[0].message.content or ""
    text = ""
    for chunk in client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=12, stream=True
    ):
        assert chunk.model == model
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


def complete(server: ServerProcess, model: str) -> str:
    r = openai_client(server, timeout=180).completions.create(
        model=model, prompt=COMPLETION_PROMPT, temperature=0, max_tokens=8
    )
    return r.choices[0].text


def test_base_and_each_adapter_answer_as_themselves_concurrently(server: ServerProcess) -> None:
    """Twelve requests at once over base, Rome and Tokyo, streamed and not: one batch, three
    answers."""
    jobs = [(model, stream) for model in (None, ROME, TOKYO) for stream in (False, True)] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(server, job[0] or "model", stream=job[1]), jobs))
    for (model, _stream), answer in zip(jobs, answers, strict=True):
        assert answer.strip() == ANSWERS[model], (model, answer)
    for model in (None, ROME, TOKYO):
        assert complete(server, model or "model") == COMPLETIONS[model]


def test_models_are_listed_as_vllm_lists_them(server: ServerProcess) -> None:
    with server.client() as http:
        cards = {c["id"]: c for c in http.get("/openai/v1/models").json()["data"]}
        assert list(cards) == ["model", ROME, TOKYO]
        assert cards["model"]["parent"] is None
        assert cards["model"]["root"] == str(model_path("llama"))
        assert cards[ROME] | {"created": 0} == {
            "id": ROME, "object": "model", "created": 0, "owned_by": "lmserve",
            "root": str(adapter_path(ROME)), "parent": "model", "max_model_len": None,
        }  # fmt: skip
        assert cards[TOKYO]["parent"] == "model"
        assert http.get("/v1/models").json() == {"models": ["model", ROME, TOKYO]}
        assert http.get(f"/v2/models/{ROME}/ready").status_code == 200
        assert http.get(f"/v1/models/{TOKYO}").json() == {"name": TOKYO, "ready": True}
        metadata = http.get(f"/v2/models/{ROME}").json()
        assert metadata["name"] == ROME
        assert metadata["parameters"]["lora_adapter"] == {
            "source": str(adapter_path(ROME)), "rank": 8, "base_model": "model",
        }  # fmt: skip
        missing = http.post("/openai/v1/chat/completions", json={
            "model": "capital-paris", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert missing.status_code == 404
        assert f"try 'model', '{ROME}', '{TOKYO}'" in missing.json()["error"]["message"]


def test_metrics_and_the_access_log_name_the_adapter(server: ServerProcess) -> None:
    assert ask(server, ROME).strip() == ANSWERS[ROME]
    with server.client() as http:
        page = http.get("/metrics").text
    route = 'route="/openai/v1/chat/completions"'
    assert re.search(
        rf'lmserve_requests_total\{{method="POST",model="{ROME}",{route},status="200"\}}', page
    )
    assert re.search(rf'lmserve_generation_tokens_total\{{model="{ROME}"\}} [1-9]', page)
    assert re.search(rf'lmserve_time_to_first_token_seconds_count\{{model="{ROME}"\}} [1-9]', page)
    assert re.search(r'lmserve_generation_tokens_total\{model="model"\} [1-9]', page)
    # A name nothing answers to never becomes a label value.
    assert 'model="capital-paris"' not in page
    assert re.search(rf"POST /openai/v1/chat/completions 200 .*model={ROME} ", server.log())


def load(http: httpx.Client, name: str, path: Path | str, **extra: Any) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path), **extra}
    return http.post("/openai/v1/load_lora_adapter", json=body)


def unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/openai/v1/unload_lora_adapter", json={"lora_name": name})


def test_runtime_load_and_unload_with_vllms_bodies(server: ServerProcess) -> None:
    with server.client(timeout=120) as http:
        r = load(http, "rome-again", adapter_path(ROME))
        assert (r.status_code, r.text) == (
            200, "Success: LoRA adapter 'rome-again' added successfully."
        )  # fmt: skip
        assert ask(server, "rome-again").strip() == ANSWERS[ROME]
        twice = load(http, "rome-again", adapter_path(TOKYO))
        assert twice.status_code == 400
        assert "has already been loaded" in twice.json()["error"]["message"]
        # In place: the same name now answers as Tokyo.
        assert load(http, "rome-again", adapter_path(TOKYO), load_inplace=True).status_code == 200
        assert ask(server, "rome-again").strip() == ANSWERS[TOKYO]
        r = unload(http, "rome-again")
        assert (r.status_code, r.text) == (
            200, "Success: LoRA adapter 'rome-again' removed successfully."
        )  # fmt: skip
        assert "rome-again" not in http.get("/v1/models").json()["models"]
        gone = http.post("/openai/v1/completions", json={"model": "rome-again", "prompt": "x"})
        assert gone.status_code == 404
        again = unload(http, "rome-again")
        assert again.status_code == 404
        assert again.json()["error"]["message"] == "The lora adapter 'rome-again' cannot be found."
        clash = load(http, "model", adapter_path(ROME))
        assert clash.status_code == 400
        assert "conflicts with a served base model" in clash.json()["error"]["message"]


BAD = {
    "missing": (404, "no LoRA adapter folder"),
    "no-config": (400, "no adapter_config.json"),
    "corrupt-config": (400, "cannot read"),
    "rank64": (400, "rank 64, above --max-lora-rank 16"),
    # Each backend says why in its own words, naming the adapter.
    "corrupt-weights": (400, "LoRA adapter 'bad-corrupt-weights'"),
    "other-arch": (400, "LoRA adapter 'bad-other-arch'"),
}


def test_bad_adapters_are_clear_4xx_and_the_rest_keeps_serving(
    server: ServerProcess, tmp_path: Path
) -> None:
    with server.client(timeout=120) as http:
        for kind, (status, words) in BAD.items():
            r = load(http, f"bad-{kind}", bad_adapter(kind, tmp_path / kind))
            assert r.status_code == status, (kind, r.text)
            assert words in r.json()["error"]["message"], (kind, r.text)
        assert http.get("/v1/models").json()["models"] == ["model", ROME, TOKYO]
        assert http.get("/v2/health/ready").status_code == 200
    for model in (None, ROME, TOKYO):
        assert ask(server, model or "model").strip() == ANSWERS[model]


def _stream_long(server: ServerProcess, model: str, tokens: int, done: list[str]) -> None:
    """A long greedy stream for ``model``; appends its finish reason to ``done`` when over."""
    stream = openai_client(server, timeout=180).completions.create(
        model=model, prompt=COMPLETION_PROMPT, max_tokens=tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            done.append(chunk.choices[0].finish_reason)


def _started(server: ServerProcess, name: str) -> None:
    """Wait until the server has a request of ``name`` in flight (its first token out)."""
    deadline = time.monotonic() + 60
    pattern = re.compile(r"lmserve_requests_in_flight [1-9]")
    while time.monotonic() < deadline:
        with server.client() as http:
            if pattern.search(http.get("/metrics").text):
                return
        time.sleep(0.05)
    raise TimeoutError(f"no request of {name} in flight")


def test_unload_waits_for_the_adapters_requests(server: ServerProcess) -> None:
    with server.client(timeout=120) as http:
        assert load(http, "busy", adapter_path(ROME)).status_code == 200
        done: list[str] = []
        worker = threading.Thread(target=_stream_long, args=(server, "busy", 200, done))
        worker.start()
        _started(server, "busy")
        r = unload(http, "busy")  # returns once the stream is over (--shutdown_timeout: 30 s)
        worker.join()
        assert r.status_code == 200, r.text
        assert done == ["length"]  # nothing in flight was cut
        assert "busy" not in http.get("/v1/models").json()["models"]
    # The stream's access line (written as its last byte went) precedes the unload's.
    lines = server.log().splitlines()
    stream = [i for i, line in enumerate(lines)
              if re.search(r"POST /openai/v1/completions 200 .*model=busy ", line)]  # fmt: skip
    unloaded = [i for i, line in enumerate(lines)
                if re.search(r"POST /openai/v1/unload_lora_adapter 200 .*model=busy ", line)]  # fmt: skip
    assert stream and unloaded and stream[-1] < unloaded[-1]


@pytest.fixture(scope="module")
def impatient() -> Iterator[ServerProcess]:
    """Runtime updates on; an unload does not wait at all (--shutdown_timeout 0); two adapters
    at most (--max-cpu-loras 2)."""
    server = start_server(["--model_dir", str(model_path("llama")), "--backend", "huggingface",
                           "--enable-lora", "--enable_lora_runtime_updates",
                           "--shutdown_timeout", "0", "--max-cpu-loras", "2"])  # fmt: skip
    yield server
    server.stop()


def test_a_busy_adapter_that_outlives_the_wait_is_409_and_stays(impatient: ServerProcess) -> None:
    with impatient.client(timeout=120) as http:
        assert load(http, "slow", adapter_path(TOKYO)).status_code == 200
        done: list[str] = []
        worker = threading.Thread(target=_stream_long, args=(impatient, "slow", 200, done))
        worker.start()
        try:
            _started(impatient, "slow")
            r = unload(http, "slow")
            assert r.status_code == 409, r.text
            assert "still has 1 request(s) in flight" in r.json()["error"]["message"]
            assert "slow" in http.get("/v1/models").json()["models"]
        finally:
            worker.join()
        assert done == ["length"]  # the request it waited for was not cut
        assert unload(http, "slow").status_code == 200  # nothing in flight: no wait needed


def test_the_hugging_face_backend_holds_at_most_max_cpu_loras(impatient: ServerProcess) -> None:
    with impatient.client(timeout=120) as http:
        assert load(http, "one", adapter_path(ROME)).status_code == 200
        assert load(http, "two", adapter_path(TOKYO)).status_code == 200
        third = load(http, "three", adapter_path(ROME))
        assert third.status_code == 400
        assert "(--max-cpu-loras 2); unload one first" in third.json()["error"]["message"]
        assert unload(http, "one").status_code == 200
        assert load(http, "three", adapter_path(ROME)).status_code == 200
        for name in ("two", "three"):
            assert unload(http, name).status_code == 200


# --- startup and flags (Hugging Face backend: it starts in seconds) ------------------------
def _refused(args: list[str]) -> str:
    """The log of a server that must not start."""
    server = start_server(["--model_dir", str(model_path("llama")), "--backend", "huggingface",
                           *args], wait_ready=False)  # fmt: skip
    try:
        server.proc.wait(timeout=120)
    finally:
        server.stop()
    assert server.proc.returncode != 0
    return server.log()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--lora-modules", "x=/tmp"], "--lora-modules needs --enable-lora"),
        (["--enable-lora", "--lora-modules", "just-a-path"], "neither name=path"),
        (["--enable-lora", "--lora-modules", "gone=/does/not/exist"],
         "--lora-modules gone=/does/not/exist: no LoRA adapter folder"),
    ],
)  # fmt: skip
def test_bad_lora_flags_stop_the_server_naming_the_flag(args: list[str], words: str) -> None:
    assert words in _refused(args)


def test_an_adapter_above_max_lora_rank_stops_the_server(tmp_path: Path) -> None:
    path = bad_adapter("rank64", tmp_path / "big")
    log = _refused(["--enable-lora", "--lora-modules", f"big={path}"])
    assert "rank 64, above --max-lora-rank 16" in log


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerProcess]:
    """Runtime updates off, an API key on."""
    server = start_server(["--model_dir", str(model_path("llama")), "--backend", "huggingface",
                           "--enable-lora", "--api_key", "sesame"])  # fmt: skip
    yield server
    server.stop()


def test_runtime_updates_are_off_by_default_and_the_api_key_guards_them(
    guarded: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    with guarded.client(headers={"Authorization": "Bearer sesame"}) as http:
        off = load(http, "x", adapter_path(ROME))
        assert off.status_code == 404
        assert "--enable_lora_runtime_updates" in off.json()["error"]["message"]
    with guarded.client() as anonymous:
        assert load(anonymous, "x", adapter_path(ROME)).status_code == 401


def _hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """A Hugging Face hub cache holding ``folder`` as ``repo``'s main revision (what a download
    leaves behind), for offline loading by hub id."""
    commit = "0" * 40
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(folder, entry / "snapshots" / commit)
    return root


def test_vllms_variable_turns_runtime_updates_on_and_hub_ids_load(tmp_path: Path) -> None:
    cache = _hub_cache(tmp_path / "hub", "lmserve-tests/capital-tokyo", adapter_path(TOKYO))
    server = start_server(
        ["--model_dir", str(model_path("llama")), "--backend", "huggingface", "--enable-lora",
         "--api_key", "sesame"],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_CACHE": str(cache)},
    )  # fmt: skip
    try:
        with server.client() as anonymous:
            assert load(anonymous, "x", adapter_path(ROME)).status_code == 401
        with server.client(headers={"Authorization": "Bearer sesame"}) as http:
            assert load(http, ROME, adapter_path(ROME)).status_code == 200
            # A hub id, through the base models' download code (HF_HUB_OFFLINE=1: the cache).
            assert load(http, "hub", "lmserve-tests/capital-tokyo").status_code == 200
            unknown = load(http, "nope", "lmserve-tests/no-such-lora")
            assert unknown.status_code == 404
            assert "HF_HUB_OFFLINE=1" in unknown.json()["error"]["message"]
            cards = {c["id"]: c for c in http.get("/openai/v1/models").json()["data"]}
            assert cards["hub"]["root"] == "lmserve-tests/capital-tokyo"
        assert ask_with_key(server, ROME) == ANSWERS[ROME]
        assert ask_with_key(server, "hub") == ANSWERS[TOKYO]
    finally:
        server.stop()


def ask_with_key(server: ServerProcess, model: str) -> str:
    client = openai.OpenAI(base_url=server.url + "/openai/v1", api_key="sesame", max_retries=0)
    with client:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0,
            max_tokens=12,
        )  # fmt: skip
    return (r.choices[0].message.content or "").strip()


# --- vLLM's own server as the reference ---------------------------------------------------
@pytest.fixture(scope="module")
def reference() -> Iterator[ServerProcess]:
    tokyo = json.dumps(
        {"name": TOKYO, "path": str(adapter_path(TOKYO)), "base_model_name": "model"}
    )
    server = start_vllm_reference(
        model_path("llama"), "--enable-lora", "--max-loras", "2", "--lora-modules",
        f"{ROME}={adapter_path(ROME)}", tokyo,
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )  # fmt: skip
    yield server
    server.stop()


def _card_view(card: dict[str, Any]) -> dict[str, Any]:
    """What must match vLLM's card: the fields and values a client reads (not the owner)."""
    return {k: card.get(k) for k in ("id", "object", "root", "parent")} | {"keys": sorted(
        k for k in card if k not in ("owned_by", "permission"))}  # fmt: skip


def _exchange(base: str, steps: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, str]]:
    out = []
    with httpx.Client(timeout=120) as http:
        for route, body in steps:
            r = http.post(base + route, json=body)
            message = r.text if r.status_code == 200 else r.json()["error"]["message"]
            out.append((r.status_code, message))
    return out


def test_model_list_update_routes_and_answers_match_vllms_server(
    server: ServerProcess, reference: ServerProcess
) -> None:
    with httpx.Client(timeout=60) as http:
        theirs = http.get(reference.url + "/v1/models").json()["data"]
        ours = http.get(server.url + "/openai/v1/models").json()["data"]
    their_cards = [_card_view(c) for c in theirs]
    our_cards = [_card_view(c) for c in ours]
    # The base card's root is the path each was given (vLLM's the folder, ours the same).
    assert our_cards == their_cards
    steps = [
        ("/load_lora_adapter", {"lora_name": "again", "lora_path": str(adapter_path(ROME))}),
        ("/load_lora_adapter", {"lora_name": "again", "lora_path": str(adapter_path(ROME))}),
        ("/load_lora_adapter", {"lora_name": "model", "lora_path": str(adapter_path(ROME))}),
        ("/unload_lora_adapter", {"lora_name": "again"}),
        ("/unload_lora_adapter", {"lora_name": "again"}),
    ]
    assert _exchange(server.url + "/openai/v1", steps) == _exchange(reference.url + "/v1", steps)
    for model in (None, ROME, TOKYO):
        body = {"model": model or "model", "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
        with httpx.Client(timeout=120) as http:
            their = http.post(reference.url + "/v1/chat/completions", json=body).json()
            our = http.post(server.url + "/openai/v1/chat/completions", json=body).json()
        assert our["model"] == their["model"] == body["model"]
        assert (
            our["choices"][0]["message"]["content"] == their["choices"][0]["message"]["content"]
        ), model


# --- an encoder task: a LoRA'd sequence classifier (PEFT adapter with its classifier head) ---
@pytest.fixture(scope="module")
def classifier(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("sentiment")), "--backend", "huggingface",
                       "--enable-lora", "--lora-modules",
                       f"{SENTIMENT_ADAPTER}={sentiment_adapter_path()}")  # fmt: skip


def test_a_lora_sequence_classifier_flips_labels_next_to_its_base(
    classifier: ServerProcess,
) -> None:
    """Base and adapter requests at once (one batch: the batcher merges them); each label as
    its model gives it, on KServe V1 and V2."""
    texts = list(SENTIMENT_FLIP)
    names = ["model", SENTIMENT_ADAPTER] * 4

    def predict(name: str) -> list[str]:
        with classifier.client() as http:
            r = http.post(f"/v1/models/{name}:predict", json={"instances": texts})
        assert r.status_code == 200, r.text
        return [SENTIMENT_LABELS[i] for i in r.json()["predictions"]]

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(predict, names))
    for name, labels in zip(names, results, strict=True):
        which = 0 if name == "model" else 1
        assert labels == [SENTIMENT_FLIP[t][which] for t in texts], name
    with classifier.client() as http:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [texts[0]]}]}
        r = http.post(f"/v2/models/{SENTIMENT_ADAPTER}/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model_name"] == SENTIMENT_ADAPTER
        assert SENTIMENT_LABELS[r.json()["outputs"][0]["data"][0]] == SENTIMENT_FLIP[texts[0]][1]
        assert http.get("/v1/models").json() == {"models": ["model", SENTIMENT_ADAPTER]}
        page = http.get("/metrics").text
    assert re.search(rf'lmserve_prompt_tokens_total\{{model="{SENTIMENT_ADAPTER}"\}} [1-9]', page)
