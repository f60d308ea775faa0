"""lmserve-protocols as a client-side library: typed requests built and responses validated
with lmserve's own pydantic models (KServe V1, Open Inference Protocol V2, OpenAI), sent with
httpx. It needs only ``pip install lmserve-protocols httpx`` (no numpy, no torch, no server).

    uv run lmserve serve --model_dir "$(uv run --no-sync python examples/tiny_model.py sentiment)"
    uv run lmserve serve --model_id all-minilm-l6-v2                  # or embeddings (built in)
    uv run --no-sync python examples/protocols_client.py --url http://127.0.0.1:8080 \
        --text "i love this movie" --text "i hate this movie"
"""

from __future__ import annotations

import argparse

import httpx
from pydantic import BaseModel, ValidationError

from lmserve_protocols.openai import (
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    OpenAIErrorResponse,
)
from lmserve_protocols.v1 import V1ModelList, V1ModelStatus, V1PredictRequest, V1PredictResponse
from lmserve_protocols.v2 import (
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ReadyResponse,
    V2RequestInput,
    V2RequestOutput,
    V2ServerMetadata,
)


def brief(value: object) -> object:
    """Long lists (embeddings) shortened for printing; floats to 4 decimals."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        head = [brief(v) for v in value[:4]]
        return [*head, f"... {len(value)} items"] if len(value) > 6 else [brief(v) for v in value]
    return value


def post(client: httpx.Client, path: str, request: BaseModel) -> httpx.Response:
    # exclude_none: optional fields left unset stay off the wire, as the protocols expect.
    return client.post(path, json=request.model_dump(mode="json", exclude_none=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="model")
    p.add_argument("--text", action="append", help="input text (repeat for more)")
    p.add_argument("--api-key", default=None)
    args = p.parse_args()
    texts: list[str] = args.text or ["i love this movie", "i hate this movie"]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    name = args.model

    with httpx.Client(base_url=args.url, headers=headers, timeout=60) as client:
        server = V2ServerMetadata.model_validate_json(client.get("/v2").content)
        print(f"server: {server.name} {server.version} extensions={','.join(server.extensions)}")
        ready = V2ReadyResponse.model_validate_json(client.get(f"/v2/models/{name}/ready").content)
        models = V1ModelList.model_validate_json(client.get("/v1/models").content)
        status = V1ModelStatus.model_validate_json(client.get(f"/v1/models/{name}").content)
        print(f"ready: {ready.ready} models: {models.models} v1 status: {status.ready}")
        meta = V2ModelMetadata.model_validate_json(client.get(f"/v2/models/{name}").content)
        task = (meta.parameters or {}).get("task")
        print(f"task: {task} platform: {meta.platform}")
        for tensor in meta.inputs:
            print(f"  input  {tensor.name} {tensor.datatype} {tensor.shape}")
        for tensor in meta.outputs:
            print(f"  output {tensor.name} {tensor.datatype} {tensor.shape}")

        # KServe V1: one prediction per instance.
        v1_request = V1PredictRequest(instances=texts)
        r = post(client, f"/v1/models/{name}:predict", v1_request)
        r.raise_for_status()
        v1 = V1PredictResponse.model_validate_json(r.content)
        print(f"v1 predictions: {brief(v1.predictions)}")

        # Open Inference Protocol V2: a BYTES tensor of texts in, named tensors out.
        v2_request = V2InferRequest(
            id="protocols-client-1",
            inputs=[
                V2RequestInput(
                    name=meta.inputs[0].name, shape=[len(texts)], datatype="BYTES", data=texts
                )
            ],
            outputs=[V2RequestOutput(name=meta.outputs[0].name)],
        )
        r = post(client, f"/v2/models/{name}/infer", v2_request)
        r.raise_for_status()
        v2 = V2InferResponse.model_validate_json(r.content)
        print(f"v2 id: {v2.id} model: {v2.model_name}")
        for output in v2.outputs:
            print(f"v2 {output.name} {output.datatype} {output.shape}: {brief(output.data)}")

        # OpenAI: the model list, and embeddings (an encoder that is not an embedding model
        # answers with a typed OpenAI error body instead).
        listed = ModelList.model_validate_json(client.get("/openai/v1/models").content)
        print(f"openai models: {[card.id for card in listed.data]}")
        r = post(client, "/openai/v1/embeddings", EmbeddingRequest(model=name, input=texts))
        if r.is_success:
            emb = EmbeddingResponse.model_validate_json(r.content)
            dims = {len(d.embedding) for d in emb.data}
            print(f"openai embeddings: {len(emb.data)} vectors of {dims} dimensions, "
                  f"{emb.usage.prompt_tokens} prompt tokens")  # fmt: skip
        else:
            err = OpenAIErrorResponse.model_validate_json(r.content).error
            print(f"openai embeddings refused ({r.status_code} {err.type}): {err.message}")

        # Errors are typed too: an unknown model is a V2 error body with a 404.
        r = post(client, "/v2/models/no-such-model/infer", v2_request)
        print(f"unknown model: {r.status_code} {V2Error.model_validate_json(r.content).error}")

    # The models validate before anything is sent: a V2 request needs at least one input.
    try:
        V2InferRequest(inputs=[])
    except ValidationError as exc:
        print(f"invalid request caught locally: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}")


if __name__ == "__main__":
    main()
