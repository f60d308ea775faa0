"""Convert a built-in GGUF model (docs/behaviour.md §7) once to a safetensors folder, then reuse it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from lmserve_core.builtin_models import (
    BuiltinModel,
    builtin_cache_dir,
    cache_lock,
    locate_builtin_file,
)

logger = logging.getLogger(__name__)


def convert_gguf(model: BuiltinModel) -> Path:
    """The converted folder for ``model``; converts on first use (about 20 s)."""
    target = builtin_cache_dir(model)
    if (target / "config.json").is_file():
        return target
    with cache_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        source = locate_builtin_file(model)
        logger.info(
            "converting built-in %s from %s to safetensors (once) ...", model.name, source.name
        )
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert(source, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "converted %s in %.1f s into %s", model.name, time.perf_counter() - started, target
        )
    return target


def _convert(gguf_file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers de-quantizes GGUF tensors with a progress bar of its own.
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # The weights are de-quantized already; drop the GGUF quantizer, which refuses to save.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
