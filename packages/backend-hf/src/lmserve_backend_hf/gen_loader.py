"""Loading a generative model (decoder-only or encoder-decoder) with transformers."""

from __future__ import annotations

import logging
import time

from lmserve_backend_hf.engine import DEFAULT_MAX_NUM_BATCHED_TOKENS, HFGenerationEngine
from lmserve_backend_hf.loader import TORCH_DTYPES, prepare, refuse_untrained_heads
from lmserve_core.backend import LoadedGenerator, LoadRequest
from lmserve_core.errors import ConfigurationError
from lmserve_core.generation.model_config import (
    generation_config,
    max_model_len,
    read_chat_template,
    sampling_defaults,
    token_ids,
)
from lmserve_core.generation.prepare import ModelFacts
from lmserve_core.hf_adapters import HFGenerationTokenizer
from lmserve_core.tasks import Task

logger = logging.getLogger(__name__)


def load_generator(request: LoadRequest) -> LoadedGenerator:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    settings, source, task = request.settings, request.source, request.task
    started = time.perf_counter()
    threads, device, dtype_name, tokenizer_source = prepare(request)
    try:
        raw_tok = AutoTokenizer.from_pretrained(
            tokenizer_source,
            revision=settings.tokenizer_revision if source.hub_id else None,
            trust_remote_code=settings.trust_remote_code,
        )
    except Exception as exc:
        raise ConfigurationError(f"cannot load the tokenizer of {source.display_name!r}: {exc}",
                                 param="model_dir") from exc  # fmt: skip
    model_cls = AutoModelForCausalLM if task is Task.text_generation else AutoModelForSeq2SeqLM
    try:
        model, loading_info = model_cls.from_pretrained(
            str(source.path), dtype=TORCH_DTYPES[dtype_name], trust_remote_code=settings.trust_remote_code,
            output_loading_info=True,
        )  # fmt: skip
    except Exception as exc:
        raise ConfigurationError(f"cannot load {source.display_name!r} as {task.value}: {exc}",
                                 param="model_dir") from exc  # fmt: skip
    refuse_untrained_heads(loading_info, source.display_name, task)
    model.eval().to(device)

    config = request.config or model.config.to_dict()
    context = max_model_len(settings.max_length, config, getattr(raw_tok, "model_max_length", None),
                            encoder_decoder=task is Task.text2text_generation)  # fmt: skip
    gen_config = generation_config(source.path)
    eos = token_ids(gen_config.get("eos_token_id")) | token_ids(
        getattr(model.generation_config, "eos_token_id", None)
    )
    tokenizer = HFGenerationTokenizer(
        raw_tok, extra_eos=eos, chat_template=read_chat_template(settings.chat_template)
    )
    pad = raw_tok.pad_token_id
    if pad is None:
        pad = next(iter(sorted(tokenizer.eos_token_ids)), 0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    engine = HFGenerationEngine(
        model, device=device, eos_token_ids=tokenizer.eos_token_ids, pad_token_id=int(pad),
        primary_eos_id=tokenizer.eos_token_id,
        max_model_len=context, vocab_size=vocab, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=(settings.max_num_batched_tokens
                                or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, settings.max_num_seqs)),
        observer=request.observer, tokenizer=raw_tok,
        max_loras=settings.max_loras if settings.enable_lora else None,
    )  # fmt: skip
    facts = ModelFacts(max_model_len=context, vocab_size=vocab, is_encoder_decoder=engine.is_encoder_decoder,
                       default_sampling=sampling_defaults(gen_config))  # fmt: skip
    logger.info(
        "loaded %s (%s) on %s in %.1f s: dtype %s, max_model_len %d, max_num_seqs %d, torch threads %d",
        source.display_name, task.value, device, time.perf_counter() - started, dtype_name, context,
        settings.max_num_seqs, threads,
    )  # fmt: skip
    batching = (
        "round-robin (encoder-decoder)" if engine.is_encoder_decoder else "shared forward passes"
    )
    return LoadedGenerator(
        backend=engine, tokenizer=tokenizer, facts=facts,
        details={"device": str(device), "dtype": dtype_name, "torch_threads": threads,
                 "architecture": (config.get("architectures") or ["?"])[0], "max_model_len": context,
                 "continuous_batching": batching},
        # Every adapter stays loaded here: --max-cpu-loras is the most held at once.
        max_adapters=settings.max_cpu_loras,
    )  # fmt: skip
