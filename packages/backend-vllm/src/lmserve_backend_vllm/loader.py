"""Start a vLLM engine for a generative or pooling model, or refuse with the reason."""

from __future__ import annotations

import logging
import time
from typing import Any

from lmserve_backend_vllm import ray_cluster
from lmserve_backend_vllm.engine_args import build_engine_args
from lmserve_backend_vllm.generator import VLLMGenerator
from lmserve_backend_vllm.pooling import PoolingTaskName, VLLMPoolingEncoder
from lmserve_backend_vllm.ray_cluster import NodeWatch
from lmserve_core.backend import LoadedEncoder, LoadedGenerator, LoadedModel, LoadRequest
from lmserve_core.encoder import EncoderOptions, ModelInfo
from lmserve_core.errors import ConfigurationError
from lmserve_core.generation.model_config import (
    generation_config,
    read_chat_template,
    sampling_defaults,
    token_ids,
)
from lmserve_core.generation.prepare import ModelFacts
from lmserve_core.hf_adapters import HFGenerationTokenizer, HFTokenizer, disable_lower_case
from lmserve_core.model_files import (
    check_reranker,
    cross_encoder_activation,
    matryoshka_dimensions,
    read_pooling_config,
)
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

logger = logging.getLogger(__name__)

# lmserve task -> vLLM pooling task. A reranker is a one-label classifier to vLLM (0.32 removed
# its "score" task for "classify"); the pair's token types travel as vLLM's scoring path sends
# them (pooling.py).
POOLING_TASKS: dict[Task, PoolingTaskName] = {
    Task.text_embedding: "embed",
    Task.sequence_classification: "classify",
    Task.rerank: "classify",
}


class UnsupportedByVLLM(ConfigurationError):
    """vLLM cannot serve this model (``--backend auto`` falls back to Hugging Face)."""


def check_supported(task: Task, config: dict[str, Any]) -> None:
    from vllm import ModelRegistry

    arch = (config.get("architectures") or ["?"])[0]
    if task is Task.text2text_generation:
        raise UnsupportedByVLLM(
            "vLLM 0.32 has no encoder-decoder models (T5, BART)", param="backend"
        )
    if not task.is_generative and task not in POOLING_TASKS:
        raise UnsupportedByVLLM(f"vLLM serves {task.value} models only through the Hugging Face backend",
                                param="backend")  # fmt: skip
    if arch not in ModelRegistry.get_supported_archs():
        raise UnsupportedByVLLM(f"vLLM does not support the architecture {arch}", param="backend")


def load(request: LoadRequest) -> LoadedModel:
    """Runs in a worker thread; the engine's own process does the heavy lifting."""
    import torch
    from transformers import AutoTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM

    settings, source, task = request.settings, request.source, request.task
    check_supported(task, request.config)
    if task is Task.rerank:  # before the engine's minute of startup
        check_reranker(request.config, source.display_name)
    on_cpu = not torch.cuda.is_available()
    started = time.perf_counter()
    args = build_engine_args(settings, str(source.path), on_cpu=on_cpu,
                             runner="pooling" if task in POOLING_TASKS else None)  # fmt: skip
    node_watch = None
    if args.distributed_executor_backend == "ray":
        node_watch = ray_cluster.prepare(args, timeout=settings.ray_cluster_timeout)
    try:
        engine = AsyncLLM.from_engine_args(args)
    except Exception as exc:
        raise ConfigurationError(
            f"the vLLM engine failed to start: {exc}", param="backend"
        ) from exc
    model_config = engine.model_config
    context = int(model_config.max_model_len)
    raw_tok = AutoTokenizer.from_pretrained(
        str(source.path), trust_remote_code=settings.trust_remote_code
    )
    # Read back from the engine's own config: what actually reached vLLM.
    config = engine.vllm_config
    details = {
        "device": "cpu" if on_cpu else "cuda",
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "architecture": (request.config.get("architectures") or ["?"])[0],
        "max_model_len": context,
        "vllm_version": _vllm_version(),
        "enforce_eager": bool(model_config.enforce_eager),
        "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
        "pipeline_parallel_size": config.parallel_config.pipeline_parallel_size,
        "distributed_executor_backend": str(config.parallel_config.distributed_executor_backend),
        "kv_cache_memory_bytes": config.cache_config.kv_cache_memory_bytes,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        **(node_watch.summary() if node_watch is not None else {}),
    }
    if config.lora_config is not None:
        details["lora"] = {"max_loras": config.lora_config.max_loras,
                           "max_lora_rank": config.lora_config.max_lora_rank,
                           "max_cpu_loras": config.lora_config.max_cpu_loras}  # fmt: skip
    logger.info("vLLM engine for %s (%s) ready in %.1f s: %s", source.display_name, task.value,
                time.perf_counter() - started, details)  # fmt: skip
    if task in POOLING_TASKS:
        return _pooling(request, engine, raw_tok, context, details, node_watch)
    gen_config = generation_config(source.path)
    tokenizer = HFGenerationTokenizer(raw_tok, extra_eos=token_ids(gen_config.get("eos_token_id")),
                                      chat_template=read_chat_template(settings.chat_template))  # fmt: skip
    vocab = int(model_config.get_vocab_size())
    generator = VLLMGenerator(
        engine, eos_token_ids=tokenizer.eos_token_ids, max_model_len=context, vocab_size=vocab,
        node_watch=node_watch,
    )  # fmt: skip
    facts = ModelFacts(max_model_len=context, vocab_size=vocab, is_encoder_decoder=False,
                       default_sampling=sampling_defaults(gen_config))  # fmt: skip
    return LoadedGenerator(generator, tokenizer, facts, details)


def _pooling(
    request: LoadRequest, engine: Any, raw_tok: Any, context: int, details: dict[str, Any],
    node_watch: NodeWatch | None,
) -> LoadedEncoder:  # fmt: skip
    settings, task, config = request.settings, request.task, request.config
    if settings.disable_lower_case:
        disable_lower_case(raw_tok)
    if request.loop is None:
        raise ConfigurationError(
            "the vLLM pooling backend needs the server's event loop", param="backend"
        )
    token_types = task is Task.rerank and reads_token_types(config, raw_tok)
    if task is Task.rerank and not token_types and _type_vocab_size(config) > 1:
        logger.warning(
            "%s has %d token types but its tokenizer gives none: its pairs reach vLLM as one "
            "segment", request.source.display_name, _type_vocab_size(config),
        )  # fmt: skip
    info = pooling_model_info(request, context)
    options = pooling_options(settings, token_type_ids=token_types)
    backend = VLLMPoolingEncoder(engine, request.loop, task=POOLING_TASKS[task],
                                 token_types=token_types, node_watch=node_watch)  # fmt: skip
    details["token_type_ids"] = token_types
    return LoadedEncoder(backend, HFTokenizer(raw_tok), info, options, details)


def pooling_model_info(request: LoadRequest, context: int) -> ModelInfo:
    """The model facts post-processing needs, read as the Hugging Face backend reads them
    (``encoder_info.model_info``): the CrossEncoder activation lmserve applies to the raw
    logit vLLM returns, and the Matryoshka sizes TextEmbedding may cut to before normalising."""
    config, path = request.config, request.source.path
    return ModelInfo(
        id2label={int(k): str(v) for k, v in (config.get("id2label") or {}).items()},
        problem_type=config.get("problem_type"),
        pooling=read_pooling_config(path),
        max_length=min(context, request.settings.max_length or context),
        hidden_size=config.get("hidden_size"),
        vocab_size=config.get("vocab_size"),
        score_activation=cross_encoder_activation(path, config),
        matryoshka_dimensions=matryoshka_dimensions(path, config),
    )


def pooling_options(settings: ServeSettings, *, token_type_ids: bool) -> EncoderOptions:
    """``token_type_ids``: the batches carry them (a BERT-style reranker's pairs), for
    ``VLLMPoolingEncoder`` to hand to vLLM; vLLM otherwise takes token ids only."""
    return EncoderOptions(
        add_special_tokens=not settings.disable_special_tokens,
        return_token_type_ids=token_type_ids,
        return_probabilities=settings.return_probabilities,
        return_raw_logits=settings.return_raw_logits,
        return_offsets_mapping=settings.return_offsets_mapping,
    )


def reads_token_types(config: dict[str, Any], tokenizer: Any) -> bool:
    """Whether a pair's token types matter: vLLM's scoring path sends them whenever the
    tokenizer gives them (``model_input_names``); a model with one token type has nothing to
    read in them."""
    names = getattr(tokenizer, "model_input_names", None) or ()
    return "token_type_ids" in names and _type_vocab_size(config) > 1


def _type_vocab_size(config: dict[str, Any]) -> int:
    value = config.get("type_vocab_size")
    return value if isinstance(value, int) else 0


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)
