"""What post-processing must know about an encoder model, read from its files (no torch).

Shared by the in-process loader and the Triton bridge, so both post-process identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve_core.backend import (
    IN_PROCESS_BATCH_SIZE,
    IN_PROCESS_CHUNK_ROWS,
    LoadedEncoder,
    LoadRequest,
)
from lmserve_core.encoder import EncoderOptions, ModelInfo
from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import (
    check_reranker,
    config_max_length,
    cross_encoder_activation,
    matryoshka_dimensions,
    read_json,
    read_pooling_config,
)
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import TextTokenizer


def model_info(
    config: dict[str, Any], path: Path, *, requested_max_length: int | None, tokenizer_max: Any
) -> ModelInfo:
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    return ModelInfo(
        id2label=id2label,
        problem_type=config.get("problem_type"),
        pooling=read_pooling_config(path),
        max_length=max_length(requested_max_length, config, path, tokenizer_max),
        hidden_size=config.get("hidden_size") or config.get("dim") or config.get("d_model"),
        vocab_size=config.get("vocab_size"),
        score_activation=cross_encoder_activation(path, config),
        matryoshka_dimensions=matryoshka_dimensions(path, config),
    )


# The tokenizer outputs lmserve can send to a graph (Triton's, or ONNX Runtime's in-process).
TENSOR_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_TENSOR_INPUTS = ("input_ids", "attention_mask")


def encoder_options(settings: ServeSettings, *, token_type_ids: bool = False) -> EncoderOptions:
    """``token_type_ids``: send them even without ``--return_token_type_ids`` (a predictor
    whose graph takes them as an input, or a reranker: BERT-style cross-encoders tell the query
    from the document by them)."""
    return EncoderOptions(
        add_special_tokens=not settings.disable_special_tokens,
        return_token_type_ids=settings.return_token_type_ids or token_type_ids,
        return_probabilities=settings.return_probabilities,
        return_raw_logits=settings.return_raw_logits,
        return_offsets_mapping=settings.return_offsets_mapping,
    )


def max_length(
    requested: int | None, config: dict[str, Any], path: Path, tokenizer_max: Any
) -> int:
    """The smallest limit the model declares; a larger --max_length is refused.

    ``tokenizer_max``: the tokenizer's ``model_max_length`` (transformers' huge sentinel for
    "unset" is ignored).
    """
    limits = []
    declared = config_max_length(config)
    if declared:
        limits.append(declared)
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        seq = read_json(st_config).get("max_seq_length")
        if isinstance(seq, int) and seq > 0:
            limits.append(seq)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000:
        limits.append(tokenizer_max)
    model_limit = min(limits) if limits else 512
    if requested is None:
        return model_limit
    if declared and requested > declared:
        raise ConfigurationError(
            f"--max_length {requested} exceeds the model's max_position_embeddings {declared}",
            param="max_length",
        )
    return requested


def tensor_inputs(names: Sequence[str], *, return_token_type_ids: bool) -> list[str]:
    if not names:
        names = [*DEFAULT_TENSOR_INPUTS, *(["token_type_ids"] if return_token_type_ids else [])]
    unknown = [n for n in names if n not in TENSOR_INPUTS]
    if unknown:
        raise ConfigurationError(
            f"--tensor_input_names: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} "
            f"not a tokenizer output lmserve sends (choose from {', '.join(TENSOR_INPUTS)})",
            param="tensor_input_names",
        )
    if "input_ids" not in names:
        raise ConfigurationError(
            "--tensor_input_names must include input_ids", param="tensor_input_names"
        )
    if len(set(names)) != len(names):
        raise ConfigurationError(
            "--tensor_input_names names a tensor twice", param="tensor_input_names"
        )
    return list(names)


@dataclass(frozen=True)
class EncoderParts:
    """What every encoder backend needs besides the model: the tokenizer, the model facts for
    post-processing, the output switches, and the graph's input tensors (graph backends)."""

    tokenizer: TextTokenizer
    info: ModelInfo
    options: EncoderOptions
    input_names: list[str] = field(default_factory=list)


def encoder_parts(
    request: LoadRequest, *, input_names: Sequence[str] = (), quiet: bool = False
) -> EncoderParts:
    """Tokenizer (without torch when tokenizer.json exists), model facts and output switches,
    checked the same way for every encoder backend. ``input_names``: the tensors a graph
    backend sends (token_type_ids among them turns them on); ``quiet``: torch is imported
    anyway, so loading the tokenizer through transformers is no warning."""
    from lmserve_backend_hf.tokenizer import load_encoder_tokenizer

    settings, source, task = request.settings, request.source, request.task
    tokenizer, tokenizer_max = load_encoder_tokenizer(request, quiet=quiet)
    if task is Task.fill_mask and tokenizer.mask_token_id is None:
        raise ConfigurationError("fill_mask needs a tokenizer with a mask token", param="task")
    if task is Task.rerank:
        check_reranker(request.config, source.display_name)
    info = model_info(
        request.config, source.path,
        requested_max_length=settings.max_length, tokenizer_max=tokenizer_max,
    )  # fmt: skip
    # A graph backend sends what --tensor_input_names lists; an in-process reranker gets them
    # whenever its forward takes them (TorchEncoder drops what it does not).
    types = "token_type_ids" in input_names or (task is Task.rerank and not input_names)
    options = encoder_options(settings, token_type_ids=types)
    return EncoderParts(tokenizer, info, options, list(input_names))


def graph_encoder_parts(request: LoadRequest) -> EncoderParts:
    """``encoder_parts`` for a graph run elsewhere (ONNX Runtime, Triton): its input tensors
    come from --tensor_input_names (checked)."""
    settings = request.settings
    names = tensor_inputs(
        settings.tensor_input_name_list, return_token_type_ids=settings.return_token_type_ids
    )
    return encoder_parts(request, input_names=names)


def front_end(request: LoadRequest, parts: EncoderParts) -> LoadedEncoder:
    """An API worker's encoder (``LoadRequest.remote``): this backend's tokenizer and model
    facts, computed as the process holding the weights computes them; the forward pass runs
    there. Batches are cut as for the in-process model (same chunking, same batch size), so
    a worker sends the padded tensors the model would have seen anyway."""
    if request.remote is None:
        raise ConfigurationError("an API worker's front end needs the model's process")
    return LoadedEncoder(
        backend=request.remote,
        tokenizer=parts.tokenizer,
        info=parts.info,
        options=parts.options,
        chunk_rows=IN_PROCESS_CHUNK_ROWS,
        default_batch_size=IN_PROCESS_BATCH_SIZE,
    )
