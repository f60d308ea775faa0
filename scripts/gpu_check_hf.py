"""GPU check of the Hugging Face backend: one short script for a machine with CUDA.

Loads the tiny trained test models (built by tests/_support/tiny_models.py and copied to
MODELS_DIR) on the GPU, compares every task with a CPU reference, checks the dtype rules
(auto = float32 for encoders; float16 on request), then serves the sentiment model from a
real server process on the GPU and asks it over V1, V2 and the metadata route.

    python scripts/gpu_check_hf.py MODELS_DIR [OUT_JSON]

Exit status 0 when every check passed; the JSON report lists each check and its figures.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve_backend_hf import create_backend
from lmserve_core.backend import LoadRequest
from lmserve_core.model_files import ModelSource, read_model_config
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

MODELS = {
    "sentiment": (Task.sequence_classification, ["I love this", "I hate this", "what a day"]),
    "ner": (Task.token_classification, ["Alice lives in Paris and works at Google", "Bob"]),
    "masked_lm": (
        Task.fill_mask,
        ["The capital of France is [MASK].", "the capital of italy is [MASK]."],
    ),
    "embedding_mean": (Task.text_embedding, ["alpha beta gamma", "one"]),
}
report: dict[str, Any] = {"checks": []}


def check(name: str, ok: bool, **figures: Any) -> None:
    report["checks"].append({"name": name, "ok": bool(ok), **figures})
    print(("PASS " if ok else "FAIL ") + name + " " + json.dumps(figures, default=str), flush=True)


def load(path: Path, task: Task, **settings: Any) -> Any:
    request = LoadRequest(
        ServeSettings(**settings), ModelSource(path, path.name), task, read_model_config(path)
    )
    return create_backend(request)


def batch_inputs(loaded: Any, texts: list[str]) -> dict[str, np.ndarray]:
    encs = loaded.tokenizer.encode_batch(texts, add_special_tokens=True, max_length=64)
    length = max(len(e) for e in encs)
    ids = np.full((len(encs), length), loaded.tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = e.ids
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def model_checks(models_dir: Path) -> None:
    for name, (task, texts) in MODELS.items():
        path = models_dir / name
        gpu = load(path, task)
        check(f"{name}: auto dtype on GPU", gpu.details["device"].startswith("cuda")
              and gpu.details["dtype"] == "float32", details=gpu.details)  # fmt: skip
        inputs = batch_inputs(gpu, texts)
        out_gpu = gpu.backend.forward(inputs)
        cpu_model = gpu.backend.model.to("cpu")
        gpu.backend.device = torch.device("cpu")
        out_cpu = gpu.backend.forward(inputs)
        diff = float(np.abs(out_gpu - out_cpu).max())
        check(f"{name}: GPU float32 equals CPU", diff < 1e-3, max_abs_diff=diff)
        del cpu_model
        half = load(path, task, dtype="float16")
        out_half = half.backend.forward(inputs)
        if task is Task.text_embedding:
            a, b = out_half.reshape(-1), out_cpu.reshape(-1)
            agree = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            ok = agree > 0.999
        else:
            mask = inputs["attention_mask"].astype(bool)
            am_h, am_c = out_half.argmax(-1), out_cpu.argmax(-1)
            if am_h.ndim == 2:
                am_h, am_c = am_h[mask], am_c[mask]
            agree = float((am_h == am_c).mean())
            ok = agree >= 0.99
        check(f"{name}: float16 on GPU agrees with float32", ok and half.details["dtype"] == "float16",
              agreement=agree, out_dtype=str(out_half.dtype))  # fmt: skip
        # Batched throughput figure (information, not a pass/fail).
        big = batch_inputs(gpu, texts * 32)
        gpu.backend.model.to("cuda")
        gpu.backend.device = torch.device("cuda")
        gpu.backend.forward(big)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            gpu.backend.forward(big)
        torch.cuda.synchronize()
        report.setdefault("forward_ms", {})[name] = round((time.perf_counter() - t0) / 20 * 1000, 3)


def server_checks(models_dir: Path) -> None:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmserve_server", "--model_dir", str(models_dir / "sentiment"),
                             "--http_port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        v1 = httpx.post(url + "/v1/models/model:predict",
                        json={"instances": ["I love this"], "parameters": {"output": "labels"}}).json()  # fmt: skip
        check(
            "server on GPU: V1 labels say POSITIVE",
            v1["predictions"][0][0]["label"] == "POSITIVE",
            v1=v1,
        )
        v2 = httpx.post(
            url + "/v2/models/model/infer",
            json={
                "inputs": [
                    {
                        "name": "t",
                        "shape": [2],
                        "datatype": "BYTES",
                        "data": ["I love this", "I hate this"],
                    }
                ]
            },
        ).json()
        check("server on GPU: V2 INT64 [1, 0]", v2["outputs"][0]["data"] == [1, 0], v2=v2)
        meta = httpx.get(url + "/v2/models/model").json()
        check("server on GPU: metadata says cuda", meta["parameters"]["device"].startswith("cuda"),
              parameters=meta["parameters"])  # fmt: skip
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
        report["server_log_tail"] = out[-3000:]


def library_checks(models_dir: Path) -> None:
    """lmserve_backend_hf's library API on the GPU: predict and generate from plain Python."""
    from lmserve_backend_hf import load_model

    with load_model(models_dir / "sentiment") as classifier:
        labels = classifier.predict(["I love this", "I hate this"], {"output": "labels"})
        device = str(classifier.service.backend.device)
        check("library on GPU: predict labels", device.startswith("cuda")
              and labels[0][0]["label"] == "POSITIVE" and labels[1][0]["label"] == "NEGATIVE",
              labels=labels, device=device)  # fmt: skip
    with load_model(models_dir / "llama") as llm:
        text = llm.generate("the capital of france is", max_tokens=8, temperature=0)
        device = str(llm.service.backend.device)
        check("library on GPU: greedy generation", device.startswith("cuda")
              and text.startswith(" paris."), text=text, device=device)  # fmt: skip


def main() -> int:
    models_dir = Path(sys.argv[1])
    out_json = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    report["torch"] = torch.__version__
    report["cuda"] = torch.cuda.is_available()
    report["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    check("CUDA is available", torch.cuda.is_available(), device=report["device_name"])
    if torch.cuda.is_available():
        model_checks(models_dir)
        server_checks(models_dir)
        library_checks(models_dir)
    report["passed"] = all(c["ok"] for c in report["checks"])
    if out_json:
        out_json.write_text(json.dumps(report, indent=2, default=str))
    print(
        json.dumps(
            {k: v for k, v in report.items() if k != "server_log_tail"}, indent=1, default=str
        )
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
