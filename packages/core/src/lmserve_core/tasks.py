"""The tasks lmserve serves, their spellings, and inference from a model's architecture."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from lmserve_core.errors import ConfigurationError


class Task(StrEnum):
    """What a served model does; picks the pre/post-processing and the routes."""

    text_generation = "text_generation"
    text2text_generation = "text2text_generation"
    fill_mask = "fill_mask"
    token_classification = "token_classification"
    sequence_classification = "sequence_classification"
    text_embedding = "text_embedding"
    # Cross-encoders: a relevance score per (query, document) pair (vLLM's "score").
    rerank = "rerank"

    @property
    def is_generative(self) -> bool:
        return self in (Task.text_generation, Task.text2text_generation)


# transformers pipeline names and other common spellings users type.
_ALIASES: dict[str, Task] = {
    "text-generation": Task.text_generation,
    "text2text-generation": Task.text2text_generation,
    "fill-mask": Task.fill_mask,
    "token-classification": Task.token_classification,
    "ner": Task.token_classification,
    "text-classification": Task.sequence_classification,
    "sentiment-analysis": Task.sequence_classification,
    "sequence-classification": Task.sequence_classification,
    "feature-extraction": Task.text_embedding,
    "sentence-similarity": Task.text_embedding,
    "text-embedding": Task.text_embedding,
    "embedding": Task.text_embedding,
    "embed": Task.text_embedding,
    "score": Task.rerank,
    "reranker": Task.rerank,
    "text-ranking": Task.rerank,
    "cross-encoder": Task.rerank,
}


def parse_task(value: str) -> Task:
    """Accept lmserve's names (``fill_mask``) and pipeline names (``fill-mask``)."""
    key = value.strip().lower()
    try:
        return Task(key)
    except ValueError:
        pass
    for spelled in (key, key.replace("_", "-")):
        if spelled in _ALIASES:
            return _ALIASES[spelled]
    if key.replace("-", "_") in Task.__members__:
        return Task(key.replace("-", "_"))
    choices = ", ".join(t.value for t in Task)
    raise ConfigurationError(f"unknown --task {value!r}; choose one of: {choices}", param="task")


# Suffix of config.architectures[0] -> task. Order matters: the longest suffix wins.
_ARCHITECTURE_SUFFIXES: tuple[tuple[str, Task], ...] = (
    ("ForSequenceClassification", Task.sequence_classification),
    ("ForTokenClassification", Task.token_classification),
    ("ForMaskedLM", Task.fill_mask),
    ("ForCausalLM", Task.text_generation),
    ("LMHeadModel", Task.text_generation),
    ("ForConditionalGeneration", Task.text2text_generation),
)


def infer_task(
    architectures: Sequence[str] | None,
    *,
    is_sentence_transformer: bool,
    is_cross_encoder: bool = False,
    num_labels: int | None = None,
) -> Task:
    """Infer the task from ``config.architectures`` (docs/behaviour.md §2); a pure string table.

    A sentence-transformers CrossEncoder directory is a reranker; any other
    sentence-transformers directory (``modules.json``) is an embedding model whatever its
    architecture says, since its pooling config is what makes it one. A sequence classifier
    with a single output label scores pairs (vLLM's rule): a reranker.
    """
    if is_cross_encoder:
        return Task.rerank
    if is_sentence_transformer:
        return Task.text_embedding
    if not architectures:
        raise ConfigurationError(
            "cannot infer the task: the model config has no 'architectures'; pass --task",
            param="task",
        )
    arch = architectures[0]
    for suffix, task in _ARCHITECTURE_SUFFIXES:
        if arch.endswith(suffix):
            if task is Task.sequence_classification and num_labels == 1:
                return Task.rerank
            return task
    raise ConfigurationError(
        f"cannot infer a supported task from architecture {arch!r}; "
        f"pass --task ({', '.join(t.value for t in Task)})",
        param="task",
    )
