"""Build every trained tiny test model under several CPU kernels and thread counts (issue 21).

Training is not portable: the same seed learns other answers on other kernels. The builder
(``tests/_support/tiny_models.py``) checks each model against what the tests assert and trains
again when a behaviour is missing. This script shows that it converges everywhere: each
configuration builds every trained model from scratch in its own cache folder, in its own
process (``ATEN_CPU_CAPABILITY`` caps the instruction set torch dispatches to; it is read at
import), and the table says which attempt passed (1 = no retry).

    uv run --no-sync python scripts/tiny_model_matrix.py                 # 3 kernels x 3 thread counts
    uv run --no-sync python scripts/tiny_model_matrix.py --capabilities default --threads 1

Exit status 1 when any build failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINED = ["sentiment", "ner", "masked_lm", "llama", "gpt2", "t5", "tools"]

# Run in the child: build each model, print one JSON line per model.
CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from _support import tiny_models
for name in {models!r}:
    try:
        path = tiny_models.model_path(name)
        record = json.loads((path / tiny_models.VERIFIED_FILE).read_text())
    except tiny_models.TinyModelNotLearned as error:
        record = {{"model": name, "error": str(error)}}
    print("RESULT " + json.dumps(record), flush=True)
"""


def build_all(capability: str, threads: int, models: list[str], root: Path) -> list[dict]:
    env = dict(os.environ, LMSERVE_TEST_MODEL_THREADS=str(threads))
    env["LMSERVE_TEST_MODELS_DIR"] = str(root / f"{capability}-{threads}")
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    code = CHILD.format(tests=str(REPO / "tests"), models=models)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    records = [
        json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if done.returncode != 0 or len(records) != len(models):
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the build for {capability}/{threads} thread(s) crashed")
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--capabilities",
        nargs="+",
        default=["native", "avx2", "default"],
        help="ATEN_CPU_CAPABILITY values; 'native' leaves it unset (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", nargs="+", type=int, default=[1, 2, 4],
        help="training thread counts (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", default=TRAINED, help="default: every trained one")
    parser.add_argument("--json", type=Path, help="also write every record to this file")
    args = parser.parse_args()

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tiny-model-matrix-") as root:
        for capability in args.capabilities:
            for threads in args.threads:
                started = time.monotonic()
                records = build_all(capability, threads, args.models, Path(root))
                for record in records:
                    record |= {"config_capability": capability, "config_threads": threads}
                rows += records
                cpu = next((r["cpu_capability"] for r in records if "cpu_capability" in r), "?")
                print(
                    f"{capability:>8} (torch: {cpu}), {threads} thread(s): "
                    + ", ".join(_cell(r) for r in records)
                    + f"  [{time.monotonic() - started:.0f} s]",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(_table(rows, args.models))
    failed = [r for r in rows if "error" in r]
    for record in failed:
        print(
            f"\nFAILED {record['config_capability']}/{record['config_threads']}: {record['error']}"
        )
    retries = sum(r["attempt"] - 1 for r in rows if "attempt" in r)
    print(f"\n{len(rows) - len(failed)}/{len(rows)} builds verified; {retries} retrain(s) in all")
    return 1 if failed else 0


def _cell(record: dict) -> str:
    if "error" in record:
        return f"{record['model']} FAILED"
    return f"{record['model']} attempt {record['attempt']}"


def _table(rows: list[dict], models: list[str]) -> str:
    configs = list(dict.fromkeys((r["config_capability"], r["config_threads"]) for r in rows))
    lines = [
        "| model | " + " | ".join(f"{c} x{t}" for c, t in configs) + " |",
        "|---|" + "---|" * len(configs),
    ]
    for model in models:
        cells = []
        for config in configs:
            record = next(
                r for r in rows
                if r["model"] == model and (r["config_capability"], r["config_threads"]) == config
            )  # fmt: skip
            cells.append("failed" if "error" in record else f"attempt {record['attempt']}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
