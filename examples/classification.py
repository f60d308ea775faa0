"""Sequence classification, token classification (NER) and fill mask over KServe V1 and the
Open Inference Protocol (V2, REST with tritonclient), as KServe's Hugging Face runtime answers.

    uv run lmserve serve --model_id distilbert/distilbert-base-uncased-finetuned-sst-2-english
    uv run lmserve serve --model_id dslim/bert-base-NER
    uv run lmserve serve --model_id google-bert/bert-base-uncased          # fill mask
    # offline: --model_dir "$(uv run --no-sync python examples/tiny_model.py sentiment)" (or ner,
    # masked_lm)
    uv run --no-sync python examples/classification.py --url http://127.0.0.1:8080 \
        --text "Hello, my dog is cute"

The V1 request with curl:

    curl -s http://127.0.0.1:8080/v1/models/model:predict -H 'content-type: application/json' \
      -d '{"instances": ["Hello, my dog is cute", "I am feeling sad"]}'
"""

from __future__ import annotations

import argparse
import json

import httpx
import numpy as np
import tritonclient.http as httpclient


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="model")
    p.add_argument("--text", action="append", help="input text (repeat for more)")
    p.add_argument("--api-key", default=None)
    args = p.parse_args()
    texts = args.text or ["Hello, my dog is cute", "I am feeling sad"]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    meta = httpx.get(f"{args.url}/v2/models/{args.model}", headers=headers).json()
    print("task:", meta["parameters"]["task"])

    # KServe V1: one prediction per instance.
    r = httpx.post(f"{args.url}/v1/models/{args.model}:predict", headers=headers,
                   json={"instances": texts})  # fmt: skip
    r.raise_for_status()
    print("v1:", json.dumps(r.json()["predictions"]))

    # Pipeline-style labels (scores, entity groups) instead of KServe's ids.
    r = httpx.post(f"{args.url}/v1/models/{args.model}:predict", headers=headers,
                   json={"instances": texts, "parameters": {"output": "labels"}})  # fmt: skip
    r.raise_for_status()
    print("labels:", json.dumps(r.json()["predictions"]))

    # Open Inference Protocol (V2) with Triton's client.
    with httpclient.InferenceServerClient(args.url.removeprefix("http://")) as client:
        tensor = httpclient.InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        result = client.infer(args.model, [tensor], headers=headers)
        for output in result.get_response()["outputs"]:
            print(f"v2 {output['name']}:", result.as_numpy(output["name"]).tolist())


if __name__ == "__main__":
    main()
