"""Loading a transformers fast tokenizer for the encoder tasks (no torch import)."""

from __future__ import annotations

from lmserve_core.errors import ConfigurationError
from lmserve_core.hf_adapters import HFTokenizer
from lmserve_core.hf_adapters import disable_lower_case as turn_off_lower_case

__all__ = ["HFTokenizer", "load_tokenizer"]


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
