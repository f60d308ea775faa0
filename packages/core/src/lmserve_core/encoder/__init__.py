"""Encoder tasks: sequence and token classification, fill-mask and embeddings."""

from lmserve_core.encoder.base import (
    EncodedRequest,
    EncoderOptions,
    EncoderResult,
    ModelInfo,
    OutputTensor,
    RequestParams,
)
from lmserve_core.encoder.service import ENCODER_TASKS, EncoderBackend, EncoderService
from lmserve_core.encoder.truncation import Truncation

__all__ = [
    "ENCODER_TASKS",
    "EncodedRequest",
    "EncoderBackend",
    "EncoderOptions",
    "EncoderResult",
    "EncoderService",
    "ModelInfo",
    "OutputTensor",
    "RequestParams",
    "Truncation",
]
