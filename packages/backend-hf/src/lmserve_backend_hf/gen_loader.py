"""Loading a generative model (decoder-only or encoder-decoder) with transformers."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from lmserve_backend_hf.engine import HFGenerationEngine
from lmserve_backend_hf.gen_tokenizer import HFGenerationTokenizer
from lmserve_backend_hf.loader import TORCH_DTYPES, configure_threads, refuse_untrained_heads
from lmserve_core.backend import LoadedGenerator, LoadRequest
from lmserve_core.errors import ConfigurationError
from lmserve_core.generation.prepare import ModelFacts
from lmserve_core.model_files import config_max_length, read_json
from lmserve_core.settings import canonical_dtype
from lmserve_core.tasks import Task

logger = logging.getLogger(__name__)

# generation_config.json fields that become sampling defaults (vLLM's `--generation-config auto`).
_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


def load_generator(request: LoadRequest) -> LoadedGenerator:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    settings, source, task = request.settings, request.source, request.task
    started = time.perf_counter()
    threads = configure_threads(settings.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = canonical_dtype(settings.dtype, on_gpu=device.type == "cuda", task=task)
    tokenizer_source = (
        source.hub_id if (source.hub_id and settings.tokenizer_revision) else str(source.path)
    )
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

    config = request.config if request.config else model.config.to_dict()
    max_model_len = _max_model_len(
        settings.max_length, config, raw_tok, encoder_decoder=task is Task.text2text_generation
    )
    gen_config = _generation_config(source.path)
    eos = _ids(gen_config.get("eos_token_id")) | _ids(
        getattr(model.generation_config, "eos_token_id", None)
    )
    tokenizer = HFGenerationTokenizer(
        raw_tok, extra_eos=eos, chat_template=_read_template(settings.chat_template)
    )
    pad = raw_tok.pad_token_id
    if pad is None:
        pad = next(iter(sorted(tokenizer.eos_token_ids)), 0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    engine = HFGenerationEngine(
        model, device=device, eos_token_ids=tokenizer.eos_token_ids, pad_token_id=int(pad),
        max_model_len=max_model_len, vocab_size=vocab, max_num_seqs=settings.max_num_seqs,
    )  # fmt: skip
    defaults = {
        k: float(gen_config[k])
        for k in _SAMPLING_DEFAULTS
        if isinstance(gen_config.get(k), int | float)
    }
    facts = ModelFacts(max_model_len=max_model_len, vocab_size=vocab,
                       is_encoder_decoder=engine.is_encoder_decoder, default_sampling=defaults)  # fmt: skip
    logger.info(
        "loaded %s (%s) on %s in %.1f s: dtype %s, max_model_len %d, max_num_seqs %d, torch threads %d",
        source.display_name, task.value, device, time.perf_counter() - started, dtype_name, max_model_len,
        settings.max_num_seqs, threads,
    )  # fmt: skip
    return LoadedGenerator(
        backend=engine, tokenizer=tokenizer, facts=facts, backend_name="huggingface",
        details={"device": str(device), "dtype": dtype_name, "torch_threads": threads,
                 "architecture": (config.get("architectures") or ["?"])[0], "max_model_len": max_model_len,
                 "continuous_batching": "shared forward passes" if not engine.is_encoder_decoder
                 else "round-robin (encoder-decoder)"},
    )  # fmt: skip


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list | tuple):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


def _generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return read_json(file) if file.is_file() else {}


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read --chat_template {path!r}: {exc}", param="chat_template"
        ) from exc


def _max_model_len(
    requested: int | None, config: dict[str, Any], tokenizer: Any, *, encoder_decoder: bool
) -> int:
    declared = config_max_length(config)
    if declared is None:
        tok_max = getattr(tokenizer, "model_max_length", None)
        declared = (
            tok_max
            if isinstance(tok_max, int) and 0 < tok_max < 1_000_000
            else (512 if encoder_decoder else 2048)
        )
    if requested is None:
        return declared
    if requested > declared and not encoder_decoder:
        raise ConfigurationError(
            f"--max_model_len {requested} exceeds the model's context of {declared}",
            param="max_length",
        )
    return requested
