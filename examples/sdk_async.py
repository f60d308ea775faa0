"""Many requests at once with the openai SDK's async client: lmserve batches them continuously.

uv run lmserve serve                                  # the built-in SmolLM2 (offline)
uv run --no-sync python examples/sdk_async.py --url http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import time

import openai

PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is",
           "Once upon a time", "def fibonacci(n):", "The sun rises in the"]  # fmt: skip


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="model")
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    async with openai.AsyncOpenAI(base_url=f"{args.url}/openai/v1", api_key=args.api_key) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(
            client.completions.create(model=args.model, prompt=prompt, max_tokens=12, temperature=0)
            for prompt in PROMPTS
        ))  # fmt: skip
        for prompt, result in zip(PROMPTS, results, strict=True):
            print(f"{prompt!r} -> {result.choices[0].text!r}")
        print(f"{len(PROMPTS)} completions in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    asyncio.run(main())
