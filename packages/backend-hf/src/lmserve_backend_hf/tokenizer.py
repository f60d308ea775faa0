"""Tokenizers for the encoder tasks: transformers' fast tokenizer, or ``tokenizer.json`` read
by the ``tokenizers`` library alone where torch must stay out (ONNX and Triton backends)."""

from __future__ import annotations

import logging
from typing import Any

from lmserve_backend_hf.rust_tokenizer import has_rust_tokenizer, load_rust_tokenizer
from lmserve_core.backend import LoadRequest
from lmserve_core.errors import ConfigurationError
from lmserve_core.hf_adapters import HFTokenizer
from lmserve_core.hf_adapters import disable_lower_case as turn_off_lower_case
from lmserve_core.tokenizer import TextTokenizer

__all__ = ["HFTokenizer", "load_encoder_tokenizer", "load_tokenizer"]

logger = logging.getLogger(__name__)


def load_tokenizer(
    path_or_id: str,
    *,
    revision: str | None,
    trust_remote_code: bool,
    disable_lower_case: bool,
) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path_or_id, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ConfigurationError(f"cannot load the tokenizer from {path_or_id!r}: {exc}",
                                 param="model_dir") from exc  # fmt: skip
    if not getattr(tok, "is_fast", False):
        raise ConfigurationError(
            f"the tokenizer of {path_or_id!r} is not a fast (Rust) tokenizer; lmserve needs "
            "character offsets", param="model_dir",
        )  # fmt: skip
    if disable_lower_case:
        turn_off_lower_case(tok)
    return HFTokenizer(tok)


def load_encoder_tokenizer(
    request: LoadRequest, *, quiet: bool = False
) -> tuple[TextTokenizer, Any]:
    """(tokenizer, its model_max_length). tokenizer.json needs no transformers (and no torch);
    without one, transformers loads the tokenizer (``quiet``: torch is imported anyway)."""
    settings, source = request.settings, request.source
    if has_rust_tokenizer(source.path) and not (source.hub_id and settings.tokenizer_revision):
        rust = load_rust_tokenizer(source.path, disable_lower_case=settings.disable_lower_case)
        return rust, rust.model_max_length
    logger.log(
        logging.INFO if quiet else logging.WARNING,
        "%s has no tokenizer.json (or asks for another tokenizer revision): loading the "
        "tokenizer with transformers, which imports torch", source.display_name,
    )  # fmt: skip
    tokenizer_source = source.hub_id if source.hub_id else str(source.path)
    hf = load_tokenizer(
        tokenizer_source,
        revision=settings.tokenizer_revision if source.hub_id else None,
        trust_remote_code=settings.trust_remote_code,
        disable_lower_case=settings.disable_lower_case,
    )
    return hf, getattr(hf.raw, "model_max_length", None)
