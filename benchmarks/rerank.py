"""Rerank pairs/s served at concurrency 32 vs. the cross-encoder's own batched forward in-process
(target: at least 0.85 of it).

The model has the shape of cross-encoder/ms-marco-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
one-label head): the built-in all-MiniLM-L6-v2 encoder weights under a
``BertForSequenceClassification`` head with ``num_labels`` 1 (seeded random head), saved by
sentence-transformers' ``CrossEncoder.save`` into lmserve's cache once. Its scores are
meaningless; its compute is the real reranker's.

Workload: ``--requests`` rerank requests, each one query (``prompts.PROMPTS`` in turn) and
``--documents`` passages drawn (seeded) from a fixed corpus of ``prompts.passages``
(``--min-words`` to ``--max-words`` words each). In one run, in alternating rounds
(``alternating.py``):

- in-process: ``CrossEncoder(dir).predict(pairs, batch_size=B)`` over every (query, document)
  pair of those requests, in this process under the server's thread settings (``--threads``
  torch intra-op threads, one inter-op thread, ``set_encoder_openmp_waits``); B is the fastest
  of ``--batch-sizes``, picked once before the rounds on part of the pairs;
- lmserve: ``lmserve serve --model_dir DIR --torch_threads T`` (Hugging Face backend, plus
  ``--server-arg`` flags), driven by ``encoder_load.run_rerank_load`` (aiohttp, closed loop at
  ``--concurrency``, ``POST /rerank``) with the same requests after ``--warmup`` unmeasured ones.

Pairs/s = pairs scored / wall time; ratio = lmserve / in-process of the same round, median over
rounds. Also recorded: the server's mean forward batch (``lmserve_batch_size`` from /metrics),
its CPU time per pair, and the padded tokens each side's batches carry (pairs tokenized as the
model does; lmserve's batches of 64 pairs in length-sorted passes of 16 as a full queue forms
them, ``predict``'s length-sorted batches of B), lmserve's tokenization time per pair, and
with ``--profile-seconds`` a py-spy profile of the server under the same load, by component
(``profile_encoder.py``'s).

    uv run --no-sync python benchmarks/rerank.py --profile-seconds 15    # ~5 min here
    uv run --no-sync python benchmarks/rerank.py --min-words 80 --max-words 80 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from alternating import alternating_rounds  # noqa: E402
from encoder_load import run_rerank_load  # noqa: E402
from encoder_throughput import cpu_seconds, histogram_totals, served_passes  # noqa: E402
from profile_encoder import summarise  # noqa: E402
from prompts import PROMPTS, passages  # noqa: E402

from _support.servers import start_server  # noqa: E402
from lmserve_backend_hf import set_encoder_openmp_waits  # noqa: E402
from lmserve_core.backend import IN_PROCESS_BATCH_SIZE  # noqa: E402

DEFAULT_OUT = HERE / "results" / "rerank.json"
TARGET = 0.85
HEAD_SEED = 0
CORPUS_SIZE = 256


# --------------------------------------------------------------------------- the model


def cross_encoder_dir(seed: int = HEAD_SEED) -> Path:
    """The MiniLM-L6 cross-encoder folder, built on first use into lmserve's cache."""
    from lmserve_core.builtin_models import cache_lock, cache_root

    directory = cache_root() / "benchmarks" / f"cross-encoder-minilm-l6-seed{seed}"
    with cache_lock(directory.with_name(directory.name + ".lock")):
        if not (directory / "config_sentence_transformers.json").is_file():
            _build(directory, seed)
    return directory


def _build(directory: Path, seed: int) -> None:
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertForSequenceClassification

    from lmserve_core.builtin_models import locate_builtin

    source = locate_builtin("all-minilm-l6-v2")
    print(f"building a MiniLM-L6 cross-encoder from {source} into {directory}", flush=True)
    torch.manual_seed(seed)  # the head (and anything else the checkpoint lacks) is seeded random
    # num_labels 1 and no problem_type: transformers 5 refuses single_label_classification
    # with one label; sentence-transformers picks the Sigmoid activation for one label.
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1)
    model.config.architectures = ["BertForSequenceClassification"]
    assert model.config.problem_type is None
    with tempfile.TemporaryDirectory(prefix="cross-encoder-hf-") as scratch:
        model.save_pretrained(scratch)
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(scratch)
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        CrossEncoder(scratch, device="cpu", local_files_only=True).save(str(staging))
        staging.rename(directory)


# --------------------------------------------------------------------------- the workload


def workload(
    requests: int, documents: int, *, seed: int, min_words: int, max_words: int
) -> list[tuple[str, list[str]]]:
    """(query, documents) per request: the queries in turn, documents drawn from the corpus."""
    corpus = passages(CORPUS_SIZE, min_words=min_words, max_words=max_words, seed=seed)
    rng = random.Random(seed + 1)
    return [(PROMPTS[i % len(PROMPTS)], rng.sample(corpus, documents)) for i in range(requests)]


def all_pairs(requests: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, str]]:
    return [(query, doc) for query, docs in requests for doc in docs]


def padding(
    model: Any, requests: Sequence[tuple[str, Sequence[str]]], batch: int
) -> dict[str, Any]:
    """Real vs padded tokens: lmserve's batches as a full queue forms them (whole requests in
    arrival order up to ``IN_PROCESS_BATCH_SIZE`` pairs, forwarded in the server's passes:
    ``served_passes``), each request alone as one pass (what lmserve did before it chunked),
    and ``predict``'s batches of ``batch`` (sorted by characters, longest first)."""
    pairs = all_pairs(requests)
    tokenizer = model.tokenizer
    lengths = [len(ids) for ids in tokenizer([q for q, _ in pairs], [d for _, d in pairs],
                                             truncation=True)["input_ids"]]  # fmt: skip
    real = sum(lengths)
    per_request, served, row, gathered = 0, 0, 0, []
    for _, docs in requests:
        chunk = lengths[row : row + len(docs)]
        per_request += max(chunk) * len(chunk)
        row += len(docs)
        if gathered and len(gathered) + len(chunk) > IN_PROCESS_BATCH_SIZE:
            served += _served_padded(gathered)
            gathered = []
        gathered += chunk
    served += _served_padded(gathered)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    sorted_batches = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        sorted_batches += max(chunk) * len(chunk)
    return {
        "pairs": len(pairs),
        "tokens_per_pair_mean": real / len(pairs),
        "tokens_per_pair_min": min(lengths),
        "tokens_per_pair_max": max(lengths),
        "lmserve_padded_per_real": served / real,
        "one_pass_per_request_padded_per_real": per_request / real,
        "in_process_padded_per_real": sorted_batches / real,
    }


def _served_padded(lengths: Sequence[int]) -> int:
    """Padded tokens of one lmserve batch of rows of ``lengths``, in the server's passes."""
    chunks = served_passes(lengths)
    return sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)


def tokenize_ms_per_pair(directory: Path, requests: Sequence[tuple[str, Sequence[str]]]) -> float:
    """lmserve's own pair tokenization (its Rust tokenizer, one request's pairs per call)."""
    from lmserve_backend_hf.rust_tokenizer import load_rust_tokenizer

    tokenizer = load_rust_tokenizer(directory, disable_lower_case=False)
    started = time.perf_counter()
    for query, docs in requests:
        tokenizer.encode_pairs([(query, d) for d in docs], add_special_tokens=True,
                               max_length=tokenizer.model_max_length)  # fmt: skip
    return 1000 * (time.perf_counter() - started) / sum(len(docs) for _, docs in requests)


# --------------------------------------------------------------------------- the two sides


def in_process_rate(model: Any, pairs: list[tuple[str, str]], batch: int) -> dict[str, Any]:
    started = time.perf_counter()
    scores = model.predict(pairs, batch_size=batch, show_progress_bar=False)
    seconds = time.perf_counter() - started
    assert len(scores) == len(pairs)
    return {"batch_size": batch, "pairs": len(pairs), "seconds": seconds,
            "pairs_per_s": len(pairs) / seconds, "loadavg_after": os.getloadavg()[0]}  # fmt: skip


def pick_batch(model: Any, pairs: list[tuple[str, str]], sizes: list[int]) -> dict[str, Any]:
    """Each batch size on the same pairs (after one warm-up pass); the fastest wins."""
    model.predict(pairs[: max(sizes)], batch_size=max(sizes), show_progress_bar=False)
    rates = {b: in_process_rate(model, pairs, b)["pairs_per_s"] for b in sizes}
    for b, rate in rates.items():
        print(f"  predict batch_size {b}: {rate:.1f} pairs/s on {len(pairs)} pairs", flush=True)
    best = max(rates, key=rates.__getitem__)
    return {"pairs": len(pairs), "pairs_per_s": {str(b): r for b, r in rates.items()},
            "chosen": best}  # fmt: skip


def batch_metric(url: str) -> tuple[float, float]:
    """(sum, count) of the ``lmserve_batch_size`` histogram: instances per forward pass."""
    return histogram_totals(url, "lmserve_batch_size")


def served_rate(
    server: Any, requests: list[tuple[str, list[str]]], concurrency: int, top_n: int
) -> dict[str, Any]:
    before_sum, before_count = batch_metric(server.url)
    cpu_before = cpu_seconds(server.proc.pid)
    m = asyncio.run(run_rerank_load(server.url, "m", requests, concurrency=concurrency,
                                    requests=len(requests), top_n=top_n))  # fmt: skip
    cpu = cpu_seconds(server.proc.pid) - cpu_before
    after_sum, after_count = batch_metric(server.url)
    pairs = sum(len(requests[i % len(requests)][1]) for i in range(m["completed"]))
    batches = after_count - before_count
    return {
        "requests": m["requests"], "completed": m["completed"], "failed": m["failed"],
        "errors": m["errors"], "pairs": pairs, "seconds": m["duration_s"],
        "pairs_per_s": pairs / m["duration_s"], "latency_ms": m["latency_ms"],
        "forward_passes": batches,
        "mean_batch_pairs": (after_sum - before_sum) / batches if batches else float("nan"),
        "server_cpu_ms_per_pair": 1000 * cpu / max(1, pairs),
        "loadavg_after": os.getloadavg()[0],
    }  # fmt: skip


def check_scores(server: Any, model: Any, query: str, docs: list[str]) -> float:
    """Largest |served - predict| over one request's documents (the same model both sides)."""
    import httpx

    body = {"model": "m", "query": query, "documents": docs}
    answer = httpx.post(server.url + "/rerank", json=body, timeout=60).json()
    served = {r["index"]: r["relevance_score"] for r in answer["results"]}
    local = model.predict([(query, d) for d in docs], batch_size=len(docs), show_progress_bar=False)
    return max(abs(served[i] - float(local[i])) for i in range(len(docs)))


def profile(
    server: Any, requests: list[tuple[str, list[str]]], concurrency: int, top_n: int, seconds: int
) -> dict[str, Any]:
    """py-spy on the server under the same load (``profile_encoder.py``'s components)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "-p", str(server.proc.pid), "-o", str(raw), "-f", "raw",
             "-d", str(seconds), "-r", "100", "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + seconds + 30
        while spy.poll() is None and time.monotonic() < deadline:
            asyncio.run(run_rerank_load(server.url, "m", requests, concurrency=concurrency,
                                        requests=concurrency, top_n=top_n))  # fmt: skip
        spy.wait(timeout=60)
        if not raw.is_file():
            why = spy.stderr.read().decode() if spy.stderr else ""
            return {"error": f"py-spy wrote nothing: {why[:300]}"}
        return summarise(raw)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    # The OpenMP waits lmserve's Hugging Face backend sets for encoders before torch loads libgomp.
    set_encoder_openmp_waits()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model-dir", default=None,
                   help="a CrossEncoder folder; none: the MiniLM-L6 one, built once")  # fmt: skip
    p.add_argument("--requests", type=int, default=48, help="measured requests per round")
    p.add_argument("--warmup", type=int, default=32, help="unmeasured requests sent first")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--documents", type=int, default=16, help="documents per request")
    p.add_argument("--min-words", type=int, default=40)
    p.add_argument("--max-words", type=int, default=120)
    p.add_argument("--top-n", type=int, default=0, help="results per answer (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch intra-op threads, both sides")  # fmt: skip
    p.add_argument("--batch-sizes", default="16,32,64", help="predict batch sizes to try")
    p.add_argument("--pick-pairs", type=int, default=256, help="pairs to pick the batch size on")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--server-arg", action="append", default=[],
                   help="an extra serve flag: --server-arg=--max_batch_size=64")  # fmt: skip
    p.add_argument("--profile-seconds", type=int, default=0,
                   help="after the rounds, py-spy the server under load this long")  # fmt: skip
    p.add_argument("--json-out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)

    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    directory = Path(args.model_dir) if args.model_dir else cross_encoder_dir()
    requests = workload(args.requests, args.documents, seed=args.seed,
                        min_words=args.min_words, max_words=args.max_words)  # fmt: skip
    pairs = all_pairs(requests)
    model = CrossEncoder(str(directory), device="cpu", local_files_only=True)
    print(f"{len(requests)} requests x {args.documents} documents = {len(pairs)} pairs; torch "
          f"threads {args.threads}; load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    pick = pick_batch(model, pairs[: args.pick_pairs], sizes)
    batch = pick["chosen"]
    pads = padding(model, requests, batch)
    print(f"  tokens per pair {pads['tokens_per_pair_mean']:.0f} (min "
          f"{pads['tokens_per_pair_min']}, max {pads['tokens_per_pair_max']}); padded / real: "
          f"predict {pads['in_process_padded_per_real']:.2f}, lmserve "
          f"{pads['lmserve_padded_per_real']:.2f} (one pass per request: "
          f"{pads['one_pass_per_request_padded_per_real']:.2f})", flush=True)  # fmt: skip
    tokenize_ms = tokenize_ms_per_pair(directory, requests)
    print(f"  lmserve's tokenizer: {tokenize_ms:.3f} ms per pair", flush=True)

    flags = ["--model_dir", str(directory), "--model_name", "m", "--torch_threads",
             str(args.threads), *args.server_arg]  # fmt: skip
    server = start_server(flags, env={"OMP_NUM_THREADS": str(args.threads)})
    results: dict[str, Any] = {
        "model": "MiniLM-L6 cross-encoder (ms-marco-MiniLM-L6-v2's shape; random head)"
        if not args.model_dir else str(directory),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "loadavg_at_start": os.getloadavg()[0],
        "threads": args.threads,
        "server_flags": flags[4:],
        "concurrency": args.concurrency,
        "requests": args.requests,
        "warmup": args.warmup,
        "documents": args.documents,
        "words_per_document": [args.min_words, args.max_words],
        "top_n": args.top_n,
        "batch_size_pick": pick,
        "in_process_batch_size": batch,
        "padding": pads,
        "lmserve_tokenize_ms_per_pair": tokenize_ms,
    }  # fmt: skip
    try:
        results["max_score_difference"] = check_scores(server, model, *requests[0])
        print(f"  served scores vs predict: max |difference| "
              f"{results['max_score_difference']:.2e}", flush=True)  # fmt: skip
        warm = requests[: args.warmup]
        asyncio.run(run_rerank_load(server.url, "m", warm, concurrency=args.concurrency,
                                    requests=len(warm), top_n=args.top_n))  # fmt: skip

        def report(r: int, row: dict[str, Any]) -> None:
            s, b = row["lmserve"], row["in_process"]
            print(f"  round {r}: in-process {b['pairs_per_s']:.1f} pairs/s (batch {batch}), "
                  f"lmserve {s['pairs_per_s']:.1f} pairs/s (mean forward batch "
                  f"{s['mean_batch_pairs']:.1f} pairs, {s['failed']} failed), ratio "
                  f"{row['ratio']:.3f}; load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip

        results |= alternating_rounds(
            [("in_process", lambda: in_process_rate(model, pairs, batch)),
             ("lmserve", lambda: served_rate(server, requests, args.concurrency, args.top_n))],
            args.rounds,
            ratio=lambda row: row["lmserve"]["pairs_per_s"] / row["in_process"]["pairs_per_s"],
            report=report,
        )  # fmt: skip
        results["loadavg_at_end"] = os.getloadavg()[0]
        if args.profile_seconds:
            results["profile"] = prof = profile(server, requests, args.concurrency, args.top_n,
                                                args.profile_seconds)  # fmt: skip
            for name, share in prof.get("components", {}).items():
                print(f"  {share:6.1%}  {name}", flush=True)
    finally:
        server.stop()
    ratio = results["median_ratio"]
    print(f"lmserve / in-process pairs/s = {ratio:.3f} (median of {args.rounds} rounds; target "
          f"{TARGET}: {'met' if ratio >= TARGET else 'missed'})")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    failed = sum(row["lmserve"]["failed"] for row in results["rounds"])
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
