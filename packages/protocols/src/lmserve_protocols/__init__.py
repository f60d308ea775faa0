"""Wire schemas of lmserve: pydantic models only, no behaviour, no numpy.

Use them on either side of the wire: a server validates what it receives and builds what it
answers (lmserve's server builds every response body, stream chunk and error from these), a
client builds what it sends (``Model(...).model_dump(exclude_none=True)``) and validates what
comes back. Optional response fields that KServe and vLLM leave out rather than send as
``null`` (a chat delta's ``role``, a chunk's ``usage``, a V2 output's ``data`` when it travels
in binary) are left out of ``model_dump_json()`` too.
Invalid payloads raise :class:`ValidationError` (pydantic's).

- :mod:`lmserve_protocols.v1`     KServe V1 (``:predict``)
- :mod:`lmserve_protocols.v2`     Open Inference Protocol V2 (REST JSON)
- :mod:`lmserve_protocols.openai` OpenAI completions, chat completions, embeddings, model list
  and the error body (with vLLM's sampling extensions)
- :mod:`lmserve_protocols.grpc`   the V2 gRPC stubs (imported on their own; they need grpcio)
"""

from pydantic import ValidationError

from lmserve_protocols.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    OpenAIErrorResponse,
)
from lmserve_protocols.v1 import V1PredictRequest, V1PredictResponse
from lmserve_protocols.v2 import (
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2RequestInput,
    V2ResponseOutput,
)

__version__ = "0.1.0"

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ModelList",
    "OpenAIErrorResponse",
    "V1PredictRequest",
    "V1PredictResponse",
    "V2InferRequest",
    "V2InferResponse",
    "V2ModelMetadata",
    "V2RequestInput",
    "V2ResponseOutput",
    "ValidationError",
]
