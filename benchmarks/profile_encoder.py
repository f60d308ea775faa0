"""Where an encoder server's CPU goes under load: a py-spy profile, summarised by component.

Starts ``lmserve serve`` on a model, drives it with ``encoder_load.py`` at ``--concurrency``
and samples the server process with py-spy (all threads, only while they run, not idle waits)
for ``--seconds``. Each sample is charged to the innermost frame of a known component
(uvicorn/h11, Starlette/FastAPI, pydantic, asyncio, lmserve's server, core and backend, the
tokenizer, torch/transformers, json); the output is each component's share of the samples and
the hottest functions.

    uv run --no-sync python benchmarks/profile_encoder.py --model sentiment --json-out prof.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from encoder_load import run_encoder_load  # noqa: E402
from encoder_throughput import locate  # noqa: E402

from _support.servers import start_server  # noqa: E402

# (component, substrings of a py-spy frame "function (package/file.py:line)"), innermost match
# wins: a frame of lmserve's batcher that calls torch counts as the model forward.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model forward (torch, transformers)", ("torch/", "transformers/")),
    ("tokenizer", ("rust_tokenizer.py", "tokenizers/", "hf_adapters.py")),
    ("lmserve core (batcher, pre/post-processing)", ("lmserve_core/",)),
    ("lmserve backend", ("lmserve_backend_hf/",)),
    ("forward channel (ZeroMQ, --api_workers)", ("zmq/", "forward_channel.py", "batch_merge.py")),
    ("lmserve server (routes, dataplane, middleware)", ("lmserve_server/",)),
    ("JSON", ("json/",)),
    ("pydantic", ("pydantic/", "pydantic_core")),
    ("FastAPI / Starlette", ("fastapi/", "starlette/")),
    ("uvicorn / HTTP parsing", ("uvicorn/", "h11/", "httptools")),
    ("asyncio event loop", ("asyncio/",)),
    ("threads (executor hand-offs, waits)", ("concurrent/", "threading.py")),
)


def component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarise(raw: Path) -> dict[str, Any]:
    by_component: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        n = int(count)
        total += n
        by_component[component(frames)] += n
        by_function[frames[-1] if frames else "?"] += n
    return {
        "samples": total,
        "components": {k: v / total for k, v in by_component.most_common()} if total else {},
        "hottest": [(k, v / total) for k, v in by_function.most_common(12)] if total else [],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sentiment")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=None)
    p.add_argument("--raw-out", default=None, help="keep py-spy's raw stacks here")
    p.add_argument("--api_workers", type=int, default=1,
                   help="serve with this many API worker processes; all are sampled")  # fmt: skip
    args = p.parse_args()
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("py-spy is not installed (it is in the dev group: uv sync)", file=sys.stderr)
        return 2
    server = start_server(["--model_dir", str(locate(args.model)), "--model_name", "m",
                           "--torch_threads", str(args.threads),
                           "--api_workers", str(args.api_workers)],
                          env={"OMP_NUM_THREADS": str(args.threads)})  # fmt: skip
    try:
        asyncio.run(run_encoder_load(server.url, "m", concurrency=args.concurrency, requests=200))
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "profile.txt"
            spy = subprocess.Popen(
                [py_spy, "record", "-p", str(server.proc.pid), "-o", str(raw), "-f", "raw",
                 "-d", str(args.seconds), "-r", "250", "--threads", "--nonblocking",
                 *(["--subprocesses"] if args.api_workers > 1 else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
            deadline = time.monotonic() + args.seconds + 5
            load = None
            while spy.poll() is None and time.monotonic() < deadline:
                load = asyncio.run(run_encoder_load(server.url, "m", concurrency=args.concurrency,
                                                    requests=400))  # fmt: skip
            spy.wait(timeout=60)
            if not raw.is_file():
                print(f"py-spy wrote nothing: {spy.stderr.read().decode() if spy.stderr else ''}",
                      file=sys.stderr)  # fmt: skip
                return 1
            if args.raw_out:
                shutil.copyfile(raw, args.raw_out)
            result = {"model": args.model, "concurrency": args.concurrency, **summarise(raw)}
            if load:
                result["requests_per_s"] = load["requests_per_s"]
    finally:
        server.stop()
    for name, share in result["components"].items():
        print(f"{share:6.1%}  {name}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
