"""Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on the data plane.

Text arrives as BYTES in ``contents.bytes_contents`` or ``raw_input_contents`` (both work,
unlike KServe's runtime); outputs go back as ``raw_output_contents``, as Triton does.
Errors map to gRPC status codes here, in one place; bad input is never INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from lmserve_core.errors import ConfigurationError, InvalidInput, LmserveError, Overloaded
from lmserve_core.v2_codec import (
    NUMPY_DTYPES,
    DecodedTensor,
    decode_inputs,
    element_count,
    encode_binary,
)
from lmserve_protocols.grpc import grpc_predict_v2_pb2 as pb
from lmserve_protocols.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from lmserve_protocols.v2 import V2TensorMetadata
from lmserve_server.dataplane import DataPlane
from lmserve_server.errors import status_of
from lmserve_server.security import OPEN_GRPC_METHODS, ApiKey

logger = logging.getLogger(__name__)
T = TypeVar("T")

# InferTensorContents field per datatype.
_CONTENT_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def status_code(exc: LmserveError) -> grpc.StatusCode:
    """The gRPC code of ``exc``, from the server's one status table."""
    return grpc.StatusCode[status_of(exc).grpc]


def _param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def parameters(params: Any) -> dict[str, Any]:
    return {key: _param_value(value) for key, value in params.items()}


def decode_request_inputs(request: pb.ModelInferRequest) -> list[DecodedTensor]:
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(
                f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs"
            )
        specs = [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
             "parameters": {"binary_data_size": len(raw)}}
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        ]  # fmt: skip
        return decode_inputs(specs, b"".join(request.raw_input_contents))
    out = []
    for t in request.inputs:
        if t.datatype not in _CONTENT_FIELD:
            raise InvalidInput(
                f"input {t.name!r}: unsupported datatype {t.datatype!r}", param="datatype"
            )
        count = element_count(list(t.shape), t.name)
        values = list(getattr(t.contents, _CONTENT_FIELD[t.datatype]))
        if len(values) != count:
            raise InvalidInput(
                f"input {t.name!r}: shape says {count} elements but contents has {len(values)}"
            )
        if t.datatype == "BYTES":
            data = np.empty(count, dtype=object)
            data[:] = values
        else:
            try:
                data = np.asarray(values, dtype=NUMPY_DTYPES[t.datatype])
            except (OverflowError, ValueError) as exc:
                raise InvalidInput(f"input {t.name!r}: {exc}") from None
        out.append(DecodedTensor(t.name, t.datatype, list(t.shape), data.reshape(list(t.shape))))
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except LmserveError as exc:
            if isinstance(exc, Overloaded):  # HTTP's Retry-After, as trailing metadata
                context.set_trailing_metadata(
                    (("retry-after", str(max(1, round(exc.retry_after)))),)
                )
            await context.abort(status_code(exc), exc.message)
        except Exception as exc:
            logger.exception("gRPC call failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        raise AssertionError("unreachable")  # context.abort raises

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        async def work() -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name))

        return await self._call(context, work)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        meta = self.plane.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=meta.extensions
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        async def work() -> pb.ModelMetadataResponse:
            meta = self.plane.model_metadata(request.name)

            def tensors(
                items: list[V2TensorMetadata],
            ) -> list[pb.ModelMetadataResponse.TensorMetadata]:
                return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                                shape=t.shape) for t in items]  # fmt: skip

            return pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform,
                                            inputs=tensors(meta.inputs), outputs=tensors(meta.outputs))  # fmt: skip

        return await self._call(context, work)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        async def work() -> pb.ModelInferResponse:
            inputs = decode_request_inputs(request)
            result = await self.plane.infer_v2(
                request.model_name,
                inputs,
                parameters(request.parameters),
                [o.name for o in request.outputs],
            )
            response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            for name, datatype, data in result.outputs:
                response.outputs.add(name=name, datatype=datatype, shape=list(data.shape))
                response.raw_output_contents.append(encode_binary(datatype, data))
            return response

        return await self._call(context, work)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses gRPC calls without ``authorization: Bearer KEY`` metadata (UNAUTHENTICATED)."""

    def __init__(self, api_key: str) -> None:
        self.key = ApiKey(api_key)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = str(details.method).rsplit("/", 1)[-1]
        if method in OPEN_GRPC_METHODS:
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if self.key.accepts(metadata.get("authorization")):
            return await continuation(details)
        return _deny_handler(await continuation(details))


def _deny_handler(handler: Any) -> Any:
    """A handler of the same shape as the real one that aborts with UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong API key: send metadata 'authorization: Bearer <key>'",
        )

    if handler is None:
        return None
    if handler.request_streaming or handler.response_streaming:
        raise NotImplementedError("lmserve's gRPC service has only unary methods")
    return grpc.unary_unary_rpc_method_handler(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def start_grpc_server(
    plane: DataPlane, host: str, port: int, *, max_message_bytes: int, api_key: str | None = None
) -> grpc.aio.Server:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # gRPC shares a port with SO_REUSEPORT by default: a second server on the same
               # port would take half the calls instead of failing to start.
               ("grpc.so_reuseport", 0)]  # fmt: skip
    interceptors = [ApiKeyInterceptor(api_key)] if api_key is not None else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)  # type: ignore[no-untyped-call]
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise ConfigurationError(
            f"cannot listen for gRPC on {host}:{port} (is the port in use?): choose another "
            "--grpc_port, or turn gRPC off with --enable_grpc false",
            param="grpc_port",
        )
    await server.start()
    logger.info("gRPC (Open Inference Protocol) listening on %s:%d", host, bound)
    return server
