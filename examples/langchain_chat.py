"""LangChain's OpenAI chat model pointed at lmserve.

uv run lmserve serve                                  # the built-in SmolLM2 (offline)
uv run --no-sync python examples/langchain_chat.py --url http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="model")
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    llm = ChatOpenAI(base_url=f"{args.url}/openai/v1", api_key=args.api_key, model=args.model,
                     temperature=0, max_completion_tokens=30)  # fmt: skip
    messages = [SystemMessage("Answer in one short sentence."),
                HumanMessage("What is the capital of France?")]  # fmt: skip
    print("invoke:", llm.invoke(messages).content)
    print("stream: ", end="", flush=True)
    for chunk in llm.stream(messages):
        print(chunk.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
