"""Text embeddings through OpenAI embeddings (openai SDK) and KServe V1.

uv run lmserve serve --model_id all-minilm-l6-v2 --model_name minilm   # built in (offline)
uv run --no-sync python examples/embeddings.py --url http://127.0.0.1:8080 --model minilm
"""

from __future__ import annotations

import argparse

import httpx
import numpy as np
import openai


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="model")
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue."]
    with openai.OpenAI(base_url=f"{args.url}/openai/v1", api_key=args.api_key) as client:
        result = client.embeddings.create(model=args.model, input=sentences)
    vectors = np.array([d.embedding for d in result.data])
    print("dimensions:", vectors.shape[1], "tokens:", result.usage.prompt_tokens)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    print(f"similar pair: {similarity[0, 1]:.3f}   unrelated pair: {similarity[0, 2]:.3f}")
    v1 = httpx.post(f"{args.url}/v1/models/{args.model}:predict",
                    headers={"Authorization": f"Bearer {args.api_key}"},
                    json={"instances": sentences[:1]}).json()  # fmt: skip
    print("v1 matches openai:", bool(np.allclose(v1["predictions"][0], vectors[0], atol=1e-5)))


if __name__ == "__main__":
    main()
