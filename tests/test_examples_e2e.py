"""Every script in examples/ runs against a real server and prints what it promises (issue 8)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from _support.servers import ServerProcess, start_server
from _support.tiny_models import model_path
from _support.triton import serve_exported

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, server: ServerProcess, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), "--url", server.url, *args],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def smol(server_pool: Pool) -> ServerProcess:
    return server_pool("--backend", "huggingface")  # the built-in SmolLM2, as the README says


def test_text_generation(smol: ServerProcess) -> None:
    out = run_example("text_generation.py", smol)
    assert re.search(r"^chat: .*Paris", out, re.M)
    assert re.search(r"^chat, streamed: .*Paris", out, re.M)
    assert re.search(r"^usage: \d+ prompt \+ 20 generated tokens$", out, re.M)


def test_sdk_async(smol: ServerProcess) -> None:
    out = run_example("sdk_async.py", smol)
    assert len(re.findall(r"^'.*' -> '.+'$", out, re.M)) == 6
    assert "6 completions in" in out


def test_langchain_chat(smol: ServerProcess) -> None:
    out = run_example("langchain_chat.py", smol)
    assert re.search(r"^invoke: .*Paris", out, re.M) and re.search(r"^stream: .*Paris", out, re.M)


def test_text2text(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("t5")))
    out = run_example("text2text.py", server, "--prompt", "capital of france")
    assert re.search(r"^output: \S", out, re.M) and "finish: " in out


@pytest.mark.parametrize(
    ("model", "text", "task"),
    [("sentiment", "i really love this movie", "sequence_classification"),
     ("ner", "Alice lives in Paris", "token_classification"),
     ("masked_lm", "the capital of france is [MASK] .", "fill_mask")],
)  # fmt: skip
def test_classification(server_pool: Pool, model: str, text: str, task: str) -> None:
    server = server_pool("--model_dir", str(model_path(model)))
    out = run_example("classification.py", server, "--text", text)
    assert f"task: {task}" in out
    assert re.search(r"^v1: \[.+\]$", out, re.M) and re.search(r"^labels: \[.+\]$", out, re.M)
    assert re.search(r"^v2 \S+: \[.+\]$", out, re.M)
    if model == "sentiment":
        assert "POSITIVE" in out
    if model == "masked_lm":
        assert "paris" in out


def test_embeddings(server_pool: Pool) -> None:
    server = server_pool("--model_id", "all-minilm-l6-v2", "--model_name", "minilm")
    out = run_example("embeddings.py", server, "--model", "minilm")
    assert "dimensions: 384" in out and "v1 matches openai: True" in out
    similar, unrelated = map(float, re.findall(r"pair: (-?[0-9.]+)", out))
    assert similar > unrelated + 0.2


def test_tiny_model_helper_prints_a_model_directory() -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "tiny_model.py"), "sentiment"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert (Path(result.stdout.strip()) / "config.json").is_file()


def _script_commands() -> list[list[str]]:
    """The ``uv run lmserve ...`` commands of triton_bridge.sh, continuation lines joined."""
    text = (EXAMPLES / "triton_bridge.sh").read_text().replace("\\\n", " ")
    return [
        shlex.split(line)[3:] for line in text.splitlines() if line.startswith("uv run lmserve")
    ]


def test_triton_bridge_script_steps(tmp_path: Path) -> None:
    """The script's own export and serve commands, with the test suite's Triton in between."""
    export, serve = _script_commands()
    assert export[0] == "export" and serve[0] == "serve"
    repo = tmp_path / "model_repository"
    export = [a.replace('"$REPO"', str(repo)).replace("$REPO", str(repo)) for a in export]
    lmserve = Path(sys.executable).parent / "lmserve"
    done = subprocess.run([str(lmserve), *export], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (repo / "minilm" / "config.pbtxt").is_file()
    triton = serve_exported(repo, {}, [])  # start Triton on the repository just written
    try:
        args = serve[1:]
        args[args.index("--predictor_host") + 1] = triton.grpc_url
        server = start_server(args)
        try:
            out = run_example("embeddings.py", server, "--model", "minilm")
            assert "dimensions: 384" in out and "v1 matches openai: True" in out
        finally:
            assert server.stop() == 0
    finally:
        triton.stop()
