"""schemathesis against lmserve's own OpenAPI schema: zero 5xx on any route (issue 7).

Two real servers, an encoder (V1, V2, embeddings) and a generator (OpenAI completions and
chat): every operation of the schema each serves gets valid and invalid requests generated
from the schema, a bounded number per operation, and none may answer 5xx. Afterwards the
server must still be ready with nothing left in flight.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from _support.reliability import assert_idle
from _support.servers import ServerProcess
from _support.tiny_models import model_path
from lmserve_server.routes.retrieval import RERANK_PATHS, SCORE_PATHS

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
EXAMPLES = 40  # per operation, mode (valid, invalid) and server
CONFIG = SchemathesisConfig.from_dict({"seed": 7})
ALIASES = {*RERANK_PATHS[1:], *SCORE_PATHS[1:], "/openai/v1/tokenize", "/openai/v1/detokenize"}


@pytest.fixture(scope="module", params=["encoder", "generator"])
def fuzzed(request: pytest.FixtureRequest, server_pool: Pool) -> ServerProcess:
    if request.param == "encoder":
        return server_pool("--model_dir", str(model_path("embedding_mean")))
    return server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface",
                       "--max_length", "64")  # fmt: skip


def _call(case: schemathesis.Case, server: ServerProcess, statuses: Counter[str]) -> str | None:
    """One generated request; a description of the failure if it answered 5xx."""
    # The served model's name, so requests get past the 404 to validation and the model.
    if case.path_parameters and "model_name" in case.path_parameters:
        case.path_parameters["model_name"] = "model"
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "model"
    response = case.call(base_url=server.url, timeout=60)
    statuses[f"{case.method} {case.path} {response.status_code}"] += 1
    if response.status_code < 500:
        return None
    return f"{response.status_code}: {response.text[:300]}\n{case.as_curl_command()}"


def _fuzz(
    operation: Any, mode: GenerationMode, server: ServerProcess, found: list[str],
    statuses: Counter[str],
) -> None:  # fmt: skip
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        failure = _call(case, server, statuses)
        if failure is not None and len(found) < 20:
            found.append(f"{operation.label} ({mode.value}) -> {failure}")

    with contextlib.suppress(Unsatisfiable):  # e.g. no invalid request for a bare GET
        run()


def test_no_route_answers_5xx(fuzzed: ServerProcess) -> None:
    # schemathesis' own pytest plugin does not run on pytest 9 yet ('Function' object has no
    # attribute '_nodeid'), so each operation's strategies are drawn with Hypothesis directly.
    api = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json", config=CONFIG)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    # vLLM's other spellings of one route run the same handler: fuzz each handler once.
    operations = [op for op in operations if op.path not in ALIASES]
    failures: list[str] = []
    statuses: Counter[str] = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, fuzzed, failures, statuses)
    assert sum(statuses.values()) >= 200
    # Valid requests reach the model: the fuzz is not only bouncing off validation.
    assert sum(n for key, n in statuses.items() if key.endswith(" 200")) >= 50, statuses
    assert not failures, "\n\n".join(failures)


def test_the_fuzzed_servers_are_healthy_and_idle(fuzzed: ServerProcess) -> None:
    assert httpx.get(fuzzed.url + "/v2/health/ready").status_code == 200
    assert_idle(fuzzed)
    assert "Traceback" not in fuzzed.log()
