"""lmserve on the Hugging Face backend vs lmserve on vLLM vs vLLM's own server, in one run.

Starts each server in turn (never two at once) on a free 127.0.0.1 port, waits for it to be
ready, warms it up with 2 requests, runs the same streaming load against it with
``serve_load.run_load`` (``vllm bench serve`` metric definitions), and stops it:

  (a) hf        lmserve --backend huggingface, built-in smollm2-135m-instruct  (/openai/v1)
  (b) lmserve-vllm  lmserve --backend vllm --enforce-eager, same model           (/openai/v1)
  (c) vllm      python -m vllm.entrypoints.openai.api_server on lmserve's converted
                folder of the same model, --enforce-eager --dtype float32          (/v1)

and prints a markdown table plus the ratios measured in this run: (b)/(a) output tok/s
("vLLM vs HF backend") and (b) against (c) ("serving overhead" of lmserve on the same
engine). Absolute numbers on a shared 2-core box swing between runs; compare the ratios.

All three get the same context limit (--max-model-len), the same --max-num-seqs and float32
weights; environment VLLM_CPU_KVCACHE_SPACE=1, OMP_NUM_THREADS=--threads, HF_HUB_OFFLINE=1.
``benchmarks/gpu_bench.py`` runs (b) and (c) through these functions on a GPU: ``--device
cuda`` leaves out VLLM_CPU_KVCACHE_SPACE, ``--no-enforce-eager`` lets vLLM capture CUDA graphs,
``--dtype auto`` keeps the checkpoint's dtype and ``--model-dir`` serves another model.

    uv run --no-sync python benchmarks/vllm_vs_hf.py --requests 4 --concurrency 2 --max-tokens 8
    uv run --no-sync python benchmarks/vllm_vs_hf.py --json-out vllm-vs-hf.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import DEFAULT_PROMPTS, format_summary, run_load

MODEL_ID = "smollm2-135m-instruct"
SERVED_NAME = "model"
STOP_GRACE_S = 20.0
LOG_TAIL_LINES = 60


@dataclass
class ServerSpec:
    key: str
    label: str
    argv: list[str]
    base_url: str
    health_path: str
    port: int
    log_path: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def converted_model_dir(model_dir: str | None = None) -> str:
    """The folder vLLM's own server loads: the built-in model's, or ``model_dir``'s."""
    from lmserve_core.model_files import resolve_model_source

    if model_dir:
        return str(resolve_model_source(model_id=None, model_dir=model_dir).path)
    return str(resolve_model_source(model_id=MODEL_ID, model_dir=None).path)


def server_specs(args: argparse.Namespace, model_dir: str) -> list[ServerSpec]:
    py = sys.executable
    specs: list[ServerSpec] = []
    model_flag = ["--model_dir", args.model_dir] if args.model_dir else ["--model_id", MODEL_ID]
    eager = ["--enforce-eager"] if args.enforce_eager else []
    common_lmserve = [
        *model_flag,
        "--model_name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--torch_threads",
        str(args.threads),
        "--dtype",
        args.dtype,
        "--max_length",
        str(args.max_model_len),
        "--max_num_seqs",
        str(args.max_num_seqs),
    ]
    for key in args.servers:
        port = free_port()
        if key == "hf":
            argv = [
                py,
                "-m",
                "lmserve_server",
                *common_lmserve,
                "--backend",
                "huggingface",
                "--http_port",
                str(port),
            ]
            specs.append(
                ServerSpec(
                    key,
                    "(a) lmserve --backend huggingface",
                    argv,
                    f"http://127.0.0.1:{port}/openai/v1",
                    "/v2/health/ready",
                    port,
                )
            )
        elif key == "lmserve-vllm":
            argv = [
                py,
                "-m",
                "lmserve_server",
                *common_lmserve,
                "--backend",
                "vllm",
                "--http_port",
                str(port),
                *eager,
            ]
            specs.append(
                ServerSpec(
                    key,
                    "(b) lmserve --backend vllm",
                    argv,
                    f"http://127.0.0.1:{port}/openai/v1",
                    "/v2/health/ready",
                    port,
                )
            )
        elif key == "vllm":
            argv = [
                py,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                model_dir,
                "--served-model-name",
                SERVED_NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *eager,
                "--dtype",
                args.dtype,
                "--max-model-len",
                str(args.max_model_len),
                "--max-num-seqs",
                str(args.max_num_seqs),
                "--disable-uvicorn-access-log",
            ]
            specs.append(
                ServerSpec(
                    key, "(c) vLLM api_server", argv, f"http://127.0.0.1:{port}/v1", "/health", port
                )
            )
        else:
            raise SystemExit(f"unknown server {key!r}: use hf, lmserve-vllm, vllm")
    return specs


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1" if args.hf_offline else "0",
            "TRANSFORMERS_OFFLINE": "1" if args.hf_offline else "0",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if args.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    else:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # CPU-only; vLLM on CUDA sizes its own cache
    if args.vllm_omp_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_omp_bind
    # Never let a proxy setting route the benchmark's own localhost traffic elsewhere.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    return env


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def log_grep(path: str, needles: tuple[str, ...]) -> list[str]:
    """Lines of the server log worth recording (thread binding, engine config)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        if any(n in line for n in needles):
            out.append(line.strip()[:400])
    return out[:20]


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> float:
    """Seconds until ``url`` answers 200; RuntimeError if the process dies or time runs out."""
    start = time.monotonic()
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before ready")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"server not ready after {timeout_s:.0f} s")
            time.sleep(1.0)


def stop_server(proc: subprocess.Popen[bytes]) -> str:
    """SIGINT to the whole process group, SIGKILL after STOP_GRACE_S; returns how it ended."""
    how = "already exited"
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=STOP_GRACE_S)
            how = f"SIGINT (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            how = "SIGKILL after SIGINT timeout"
    # Children (vLLM's engine core, tokenizer workers) may outlive the leader: clear the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)
    return how


def run_one(
    spec: ServerSpec, args: argparse.Namespace, env: dict[str, str], log_dir: str
) -> dict[str, Any]:
    spec.log_path = os.path.join(log_dir, f"{spec.key}.log")
    result: dict[str, Any] = {
        "server": spec.key,
        "label": spec.label,
        "command": spec.argv,
        "base_url": spec.base_url,
        "log": spec.log_path,
        "ok": False,
    }
    print(f"\n=== {spec.label}: starting on port {spec.port} (log {spec.log_path})", flush=True)
    print("    " + " ".join(spec.argv), flush=True)
    with open(spec.log_path, "wb") as log:
        proc = subprocess.Popen(
            spec.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        try:
            result["startup_s"] = wait_ready(
                proc, f"http://127.0.0.1:{spec.port}{spec.health_path}", args.startup_timeout
            )
        except RuntimeError as exc:
            result["error"] = f"failed to start: {exc}"
            result["log_tail"] = log_tail(spec.log_path)
            print(
                f"!!! {spec.label} {result['error']}; log tail:\n{result['log_tail']}", flush=True
            )
            return result
        print(f"    ready after {result['startup_s']:.1f} s; warming up", flush=True)
        prompts = list(DEFAULT_PROMPTS)
        warm = asyncio.run(
            run_load(
                spec.base_url,
                SERVED_NAME,
                concurrency=2,
                requests=2,
                max_tokens=args.max_tokens,
                prompts=prompts,
                path=args.path,
                timeout_s=args.timeout,
                sample_texts=2,
            )
        )
        result["warmup_errors"] = warm["errors"]
        result["warmup_texts"] = warm.get("samples") or []
        if warm["completed"] == 0:
            result["error"] = f"warm-up failed: {warm['error_samples']}"
            result["log_tail"] = log_tail(spec.log_path)
            print(
                f"!!! {spec.label} {result['error']}; log tail:\n{result['log_tail']}", flush=True
            )
            return result
        metrics = asyncio.run(
            run_load(
                spec.base_url,
                SERVED_NAME,
                concurrency=args.concurrency,
                requests=args.requests,
                max_tokens=args.max_tokens,
                prompts=prompts,
                path=args.path,
                timeout_s=args.timeout,
                max_duration_s=args.max_duration,
            )
        )
        result["metrics"] = metrics
        result["ok"] = metrics["completed"] > 0
        print(format_summary(metrics), flush=True)
        if not result["ok"]:
            result["error"] = f"load failed: {metrics['error_samples']}"
            result["log_tail"] = log_tail(spec.log_path)
        return result
    finally:
        result["stopped"] = stop_server(proc)
        result["log_notes"] = log_grep(
            spec.log_path,
            ("core ids=", "OpenMP thread binding", "max_num_seqs", "Traceback", "Error", "ERROR"),
        )
        print(f"    stopped: {result['stopped']}", flush=True)


# --- report --------------------------------------------------------------------------------
def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _get(results: dict[str, dict[str, Any]], key: str, *path: str) -> float | None:
    r = results.get(key)
    if not r or not r.get("ok"):
        return None
    value: Any = r["metrics"]
    for p in path:
        value = value[p]
    return float(value)


def comparisons(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out_tps = {k: _get(results, k, "output_throughput") for k in ("hf", "lmserve-vllm", "vllm")}
    cmp: dict[str, Any] = {
        "vllm_backend_vs_hf_backend_output_tps": _ratio(out_tps["lmserve-vllm"], out_tps["hf"]),
        "lmserve_vllm_vs_vllm_server_output_tps": _ratio(out_tps["lmserve-vllm"], out_tps["vllm"]),
        "vllm_server_vs_hf_backend_output_tps": _ratio(out_tps["vllm"], out_tps["hf"]),
    }
    # Greedy float32 on the same weights: the two warm-up completions should agree with
    # vLLM's own server. (b) runs the same engine, so it must match (c) exactly; (a) may
    # differ where the model's greedy choice is EOS, because vLLM's ignore_eos emits EOS
    # and continues (the token is hidden by skip_special_tokens) where a backend that
    # masks EOS picks the runner-up token.
    texts = {k: r.get("warmup_texts") for k, r in results.items() if r.get("warmup_texts")}
    for key in ("hf", "lmserve-vllm"):
        cmp[f"warmup_texts_{key}_equal_vllm_server"] = (
            texts[key] == texts["vllm"] if key in texts and "vllm" in texts else None
        )
    for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
        for stat in ("mean", "p50"):
            b = _get(results, "lmserve-vllm", metric, stat)
            c = _get(results, "vllm", metric, stat)
            cmp[f"lmserve_vllm_minus_vllm_server_{metric}_{stat}"] = (
                None if b is None or c is None else b - c
            )
            cmp[f"lmserve_vllm_over_vllm_server_{metric}_{stat}"] = _ratio(b, c)
    return cmp


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def markdown(
    results: dict[str, dict[str, Any]], cmp: dict[str, Any], args: argparse.Namespace
) -> str:
    lines = [
        f"Load: concurrency {args.concurrency}, {args.requests} requests, max_tokens "
        f"{args.max_tokens}, ignore_eos, temperature 0, {args.path}; threads {args.threads}.",
        "",
        "| server | status | startup s | req/s | out tok/s | TTFT mean / p50 / p99 ms "
        "| TPOT mean / p50 / p99 ms | ITL mean / p50 / p99 ms | E2E p50 / p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in args.servers:
        r = results.get(key, {"label": key})
        if not r.get("ok"):
            reason = str(r.get("error", "not run")).replace("|", "/").replace("\n", " ")[:120]
            lines.append(
                f"| {r['label']} | FAILED: {reason} | {_fmt(r.get('startup_s'))} | | | | | | | |"
            )
            continue
        m = r["metrics"]

        def trio(k: str, m: dict[str, Any] = m) -> str:
            return f"{m[k]['mean']:.1f} / {m[k]['p50']:.1f} / {m[k]['p99']:.1f}"

        status = (
            "ok"
            if m["token_count_mismatches"] == 0
            else (f"ok, {m['token_count_mismatches']} token-count mismatches")
        )
        lines.append(
            f"| {r['label']} | {status} | {r['startup_s']:.1f} | {m['request_throughput']:.3f} "
            f"| {m['output_throughput']:.2f} | {trio('ttft_ms')} | {trio('tpot_ms')} "
            f"| {trio('itl_ms')} | {m['e2el_ms']['p50']:.1f} / {m['e2el_ms']['p99']:.1f} "
            f"| {m['errors']} |"
        )
    lines += [
        "",
        "| comparison (same run) | value |",
        "|---|---:|",
        "| vLLM vs HF backend: (b)/(a) output tok/s | "
        f"{_fmt(cmp['vllm_backend_vs_hf_backend_output_tps'], '.2f', 'x')} |",
        "| serving overhead: (b)/(c) output tok/s | "
        f"{_fmt(cmp['lmserve_vllm_vs_vllm_server_output_tps'], '.2f', 'x')} |",
    ]
    for metric, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")):
        for stat in ("mean", "p50"):
            d = cmp[f"lmserve_vllm_minus_vllm_server_{metric}_{stat}"]
            q = cmp[f"lmserve_vllm_over_vllm_server_{metric}_{stat}"]
            lines.append(
                f"| serving overhead: {name} {stat} (b) - (c) | "
                f"{_fmt(d, '+.1f', ' ms')} ({_fmt(q, '.2f', 'x')}) |"
            )
    for key, name in (("lmserve-vllm", "(b)"), ("hf", "(a)")):
        same = cmp[f"warmup_texts_{key}_equal_vllm_server"]
        lines.append(
            f"| greedy warm-up texts {name} == (c) | "
            f"{'n/a' if same is None else ('yes' if same else 'no')} |"
        )
    lines.append(
        "| (for reference) vLLM's own server vs HF backend: (c)/(a) output tok/s | "
        f"{_fmt(cmp['vllm_server_vs_hf_backend_output_tps'], '.2f', 'x')} |"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for every server and lmserve's --torch_threads",
    )
    p.add_argument(
        "--servers",
        default="hf,lmserve-vllm,vllm",
        help="comma list, run in this order: hf (a), lmserve-vllm (b), vllm (c)",
    )
    p.add_argument("--path", default="/completions", help="/completions or /chat/completions")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32, help="lmserve's default is 32")
    p.add_argument(
        "--vllm-omp-bind",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND for (b) and (c) (default: vLLM's 'auto')",
    )
    p.add_argument(
        "--hf-offline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HF_HUB_OFFLINE=1 for every server",
    )
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    p.add_argument(
        "--max-duration",
        type=float,
        default=900.0,
        help="time cap per load run: no new request after it, s",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu sets VLLM_CPU_KVCACHE_SPACE=1 for every server; cuda leaves it out",
    )
    p.add_argument("--dtype", default="float32", help="--dtype of every server")
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--enforce-eager for (b) and (c) (no torch.compile / CUDA graphs)",
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help=f"serve this model folder instead of the built-in {MODEL_ID}",
    )
    p.add_argument("--json-out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    model_dir = converted_model_dir(args.model_dir)
    specs = server_specs(args, model_dir)
    env = server_env(args)
    log_dir = tempfile.mkdtemp(prefix="vllm_vs_hf-")
    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    for spec in specs:
        results[spec.key] = run_one(spec, args, env, log_dir)
    cmp = comparisons(results)
    table = markdown(results, cmp, args)
    print("\n" + table)
    print(f"\nserver logs: {log_dir}")
    report = {
        "benchmark": "vllm_vs_hf",
        "started_unix": started,
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "model_id": None if args.model_dir else MODEL_ID,
        "model_dir": model_dir,
        "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
        "env": {
            k: env[k]
            for k in ("VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")
            if k in env
        }
        | (
            {"VLLM_CPU_OMP_THREADS_BIND": env["VLLM_CPU_OMP_THREADS_BIND"]}
            if "VLLM_CPU_OMP_THREADS_BIND" in env
            else {}
        ),
        "results": results,
        "comparisons": cmp,
        "markdown": table,
    }
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json_out}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
