"""Text2text generation (T5, BART) through OpenAI completions.

    uv run lmserve serve --model_id google-t5/t5-small            # from the hub, or offline:
    uv run lmserve serve --model_dir "$(uv run --no-sync python examples/tiny_model.py t5)"
    uv run --no-sync python examples/text2text.py --url http://127.0.0.1:8080 \
        --prompt "translate English to German: The house is wonderful."
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="model")
    p.add_argument("--prompt", default="translate English to German: The house is wonderful.")
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    with openai.OpenAI(base_url=f"{args.url}/openai/v1", api_key=args.api_key) as client:
        r = client.completions.create(model=args.model, prompt=args.prompt, max_tokens=30,
                                      temperature=0)  # fmt: skip
        print("output:", r.choices[0].text)
        print("finish:", r.choices[0].finish_reason)


if __name__ == "__main__":
    main()
