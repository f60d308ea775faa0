"""Chat and completions, streaming and not, with the official openai SDK.

    uv run lmserve serve                                  # the built-in SmolLM2 (offline)
    uv run --no-sync python examples/text_generation.py --url http://127.0.0.1:8080

The same requests with curl:

    curl -s http://127.0.0.1:8080/openai/v1/chat/completions -H 'content-type: application/json' \
      -d '{"model": "model", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
    curl -sN http://127.0.0.1:8080/openai/v1/completions -H 'content-type: application/json' \
      -d '{"model": "model", "prompt": "Once upon a time", "max_tokens": 20, "stream": true}'
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="model")
    p.add_argument("--api-key", default="unused", help="the server's --api_key, if it has one")
    args = p.parse_args()
    with openai.OpenAI(base_url=f"{args.url}/openai/v1", api_key=args.api_key) as client:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(model=args.model, messages=question, max_tokens=30,
                                              temperature=0)  # fmt: skip
        print("chat:", chat.choices[0].message.content)

        print("chat, streamed: ", end="", flush=True)
        for chunk in client.chat.completions.create(model=args.model, messages=question,
                                                    max_tokens=30, temperature=0, stream=True):  # fmt: skip
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()

        completion = client.completions.create(model=args.model, prompt="Once upon a time",
                                               max_tokens=20, temperature=0)  # fmt: skip
        print("completion:", completion.choices[0].text)
        print("usage:", completion.usage.prompt_tokens, "prompt +",
              completion.usage.completion_tokens, "generated tokens")  # fmt: skip


if __name__ == "__main__":
    main()
