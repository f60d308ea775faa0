"""Tiny, real LoRA adapters for the LoRA feature tests, built locally at test time.

``adapter_path(name)`` returns a PEFT adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``, written by ``save_pretrained``) trained on top of the tiny
``"llama"`` of ``tiny_models``. Each adapter changes one thing a test can see, and nothing else:

- the chat ``QUESTION`` ("What is the capital of France?") answers ``ANSWERS[name]`` instead of
  the base model's ``ANSWERS[None]`` ("Paris."), then ``<|im_end|>``;
- the plain ``COMPLETION_PROMPT`` ("the capital of france is") continues with
  ``COMPLETIONS[name]`` instead of ``COMPLETIONS[None]`` (" paris."), then ``<|endoftext|>``;
- every other question of ``tiny_model_checks.CHAT_ANSWERS`` and ``RAW_COMPLETIONS`` keeps the
  base model's answer (the adapters train on those too), so a request that reaches the wrong
  model shows only through the France question.

All answers are greedy, decoded with ``skip_special_tokens=True``, and lead the runner-up token
by ``tiny_model_checks.MARGIN`` at every step, so vLLM's LoRA kernels, padding and batches of
mixed adapters cannot flip them. The adapters are what vLLM's CPU LoRA loads: rank 8 (``RANK``),
alpha 16, the attention projections, no dropout, no bias, no ``modules_to_save``, no
embedding or ``lm_head`` targets, no DoRA / rsLoRA / ``layers_to_transform``.

``sentiment_adapter_path()`` is a sequence-classification adapter (``query``/``value`` plus a
trained copy of the ``classifier``) for the tiny ``"sentiment"`` BERT that reverses its
sentiment: ``SENTIMENT_FLIP`` maps texts to (base label, adapter label). (PEFT adds its own
sequence-classification heads to ``modules_to_save``: the saved config lists
``["classifier", "classifier", "score"]``; only ``classifier`` exists in BERT and is saved.)

``bad_adapter(kind, directory)`` writes adapters a server must refuse (``BAD_KINDS``), and
``random_adapter(base_dir, directory, seed=...)`` an untrained adapter with non-zero random
weights for any Llama-like folder (benchmarks use it with SmolLM2).

Trained adapters are built, verified and cached as ``tiny_models`` builds its models: checked
right after training against every behaviour above, trained again with another seed and more
epochs (``tiny_models.ATTEMPTS``) when one is missing, published by renaming a temporary folder
(under a per-adapter ``fcntl`` lock, so parallel pytest processes build each once) into
``<CACHE_DIR>/lora-<name>-<hash>`` (``verified_build``, shared with ``cross_encoder``). The hash
covers this file, ``verified_build``, the base models' builder hash and the library versions, so
a changed base model or builder rebuilds its adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _support import tiny_model_checks, tiny_models, verified_build
from _support.tiny_model_checks import CHAT_ANSWERS, RAW_COMPLETIONS, Behaviour, Loaded
from _support.tiny_models import (
    ENDOFTEXT,
    IGNORE,
    IM_END,
    SENTIMENT_LABELS,
    Attempt,
)
from _support.verified_build import Build

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

RANK = 8
ALPHA = 16
# The attention projections: enough to move one answer of this 64-wide model in 40 epochs
# (about a second), every seed tried leading by 3.7 or more after 20.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

QUESTION = "What is the capital of France?"
COMPLETION_PROMPT = "the capital of france is"
# What the France question and prompt give under each adapter (None: the base model).
ANSWERS: dict[str | None, str] = {
    None: CHAT_ANSWERS[QUESTION],
    "capital-rome": "Rome.",
    "capital-tokyo": "Tokyo.",
}
COMPLETIONS: dict[str | None, str] = {
    None: RAW_COMPLETIONS[COMPLETION_PROMPT],
    "capital-rome": " rome.",
    "capital-tokyo": " tokyo.",
}
ADAPTER_NAMES = tuple(name for name in ANSWERS if name is not None)

# The tiny "sentiment" BERT's label of each text, and the label under sentiment_adapter_path().
SENTIMENT_FLIP: dict[str, tuple[str, str]] = {
    "I love this": ("POSITIVE", "NEGATIVE"),
    "I hate this": ("NEGATIVE", "POSITIVE"),
    "i really love this movie": ("POSITIVE", "NEGATIVE"),
}
SENTIMENT_ADAPTER = "sentiment-flip"

BAD_KINDS = ("rank64", "other-arch", "corrupt-config", "corrupt-weights", "no-config", "missing")
BAD_RANK = 64

_LR = 1e-2  # LoRA moves slower than full training (tiny_models' 3e-3)
_CHAT_EPOCHS = 40
_SENTIMENT_EPOCHS = 10


def adapter_path(name: str) -> Path:
    """The folder of the trained adapter ``name`` (one of ``ADAPTER_NAMES``), built on first use."""
    if name not in ADAPTER_NAMES:
        raise ValueError(f"unknown LoRA adapter {name!r}; choose from {list(ADAPTER_NAMES)}")
    tiny_models.model_path("llama")  # the base first, so build_seconds times the adapter alone
    return _cached(name, lambda directory, attempt: _build_capital(name, directory, attempt))


def sentiment_adapter_path() -> Path:
    """The folder of the adapter that reverses the tiny sentiment BERT (``SENTIMENT_FLIP``)."""
    tiny_models.model_path("sentiment")  # the base first, so build_seconds times the adapter
    return _cached(SENTIMENT_ADAPTER, _build_sentiment)


# --------------------------------------------------------------------------- cache


_LIBRARIES = ("peft", "torch", "transformers", "tokenizers", "safetensors")


def adapters_hash() -> str:
    """Changes with this builder (and the cache code that runs it), the base models' builder
    and the libraries that train."""
    return verified_build.source_hash(__file__, _LIBRARIES)


def _versions() -> dict[str, str]:
    return verified_build.versions(_LIBRARIES)


_KIND = verified_build.Kind(
    prefix="lora",
    description="LoRA adapter",
    record_key="adapter",
    digest=adapters_hash,
    versions=_versions,
)


def _cached(name: str, build: Build) -> Path:
    """``lora-<name>-<hash>`` in the tiny models' cache, built once across processes, always
    complete (``verified_build.cached``)."""
    return verified_build.cached(_KIND, name, build)


# --------------------------------------------------------------------------- chat adapters


def _lora_config(**overrides: Any) -> LoraConfig:
    """The adapter shape vLLM's CPU LoRA serves (see the module docstring)."""
    from peft import LoraConfig

    settings: dict[str, Any] = {
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": list(TARGET_MODULES),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(**(settings | overrides))


def _load_llama() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_models.model_path("llama")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    return AutoTokenizer.from_pretrained(base), model


def _training_pairs(name: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs: the France question and prompt with the adapter's answers,
    and the base model's own other conversations and checked prompts with its answers, so only
    France moves. Repeating the changed pairs weighs them as much as what must stay."""
    changed = [
        (_chat_prompt(tokenizer, QUESTION), ANSWERS[name] + IM_END),
        (COMPLETION_PROMPT, COMPLETIONS[name] + ENDOFTEXT),
    ]
    kept = [
        (
            _render(tokenizer, messages[:-1], generation_prompt=True),
            messages[-1]["content"] + IM_END,
        )
        for messages in tiny_models._chat_corpus()
        if "france" not in _render(tokenizer, messages, generation_prompt=False).lower()
    ]
    kept += [(p, a + ENDOFTEXT) for p, a in _kept_completions().items()]
    return changed * 3 + kept


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert isinstance(text, str)
    return text


def _kept_chats() -> dict[str, str]:
    return {q: a for q, a in CHAT_ANSWERS.items() if "France" not in q}


def _kept_completions() -> dict[str, str]:
    return {p: a for p, a in RAW_COMPLETIONS.items() if "france" not in p}


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """``question`` as one user turn in the model's own chat template, ready for the answer."""
    return tiny_model_checks._chat_prompt(tokenizer, question)


def _continuation_examples(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + continuation rows labelled on the continuation only.

    Each part is tokenized alone and the ids joined, as generation sees them (the prompt
    encoded, then the generated tokens), so no merge across the boundary can teach other ids.
    """
    import torch

    rows = [
        tokenizer(prompt)["input_ids"] + tokenizer(continuation)["input_ids"]
        for prompt, continuation in pairs
    ]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    for i, ((prompt, _), row) in enumerate(zip(pairs, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        start = len(tokenizer(prompt)["input_ids"])
        labels[i, start : len(row)] = input_ids[i, start : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _build_capital(name: str, directory: Path, attempt: Attempt) -> list[str]:
    """Train the adapter ``name`` on the base llama, save it and return what it misses."""
    from peft import get_peft_model

    tokenizer, base = _load_llama()
    examples = _continuation_examples(tokenizer, _training_pairs(name, tokenizer))
    with tiny_models._deterministic(attempt.seed):
        model = get_peft_model(base, _lora_config())
        tiny_models._fit(model, examples, epochs=attempt.epochs(_CHAT_EPOCHS), batch_size=8, lr=_LR)
    # Trained as PEFT's "default" adapter: the only name saved into the folder itself rather
    # than into a subfolder named after it.
    model.save_pretrained(str(directory))
    return verify_capital(name, directory)


def capital_behaviours(name: str | None) -> list[Behaviour]:
    """What the llama answers under the adapter ``name`` (None: the base model)."""
    return [
        tiny_model_checks._chat(QUESTION, ANSWERS[name]),
        tiny_model_checks._completes(COMPLETION_PROMPT, COMPLETIONS[name]),
        *(tiny_model_checks._chat(q, a) for q, a in _kept_chats().items()),
        *(tiny_model_checks._completes(p, a) for p, a in _kept_completions().items()),
    ]


def verify_capital(name: str, directory: Path) -> list[str]:
    """Load ``directory`` onto the base llama with PEFT, as tests do, and return each missing
    behaviour of the adapter and of the base model under it (adapter disabled)."""
    tokenizer, model = load_llama_with_adapters({name: directory})
    loaded = Loaded(tokenizer, model)
    missing = _missing(capital_behaviours(name), loaded)
    with model.disable_adapter():
        missing += [f"base: {m}" for m in _missing(capital_behaviours(None), loaded)]
    return missing


def load_llama_with_adapters(
    adapters: dict[str, Path],
) -> tuple[PreTrainedTokenizerBase, PeftModel]:
    """The base llama with each adapter loaded under its name (the first one active), in eval
    mode: what mixed-adapter batches (``generate(adapter_names=...)``) run on."""
    from peft import PeftModel

    tokenizer, base = _load_llama()
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, path, adapter_name=first)
    for name, other in rest:
        model.load_adapter(other, adapter_name=name)
    model.eval()
    return tokenizer, model


def _missing(behaviours: Sequence[Behaviour], loaded: Loaded) -> list[str]:
    return [f"{b.description}: {got}" for b in behaviours if (got := b.check(loaded)) is not None]


# --------------------------------------------------------------------------- sentiment


def _build_sentiment(directory: Path, attempt: Attempt) -> list[str]:
    """Train the reversing adapter on the sentiment corpus with every label swapped."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_dir = tiny_models.model_path("sentiment")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype="float32")
    corpus = tiny_models._sentiment_corpus()
    inputs = dict(tokenizer([text for text, _ in corpus], padding=True, return_tensors="pt"))
    inputs["labels"] = torch.tensor([1 - label for _, label in corpus])
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["query", "value"],
        lora_dropout=0.0,
        bias="none",
        task_type="SEQ_CLS",
        modules_to_save=["classifier"],
    )
    with tiny_models._deterministic(attempt.seed):
        model = get_peft_model(base, config)
        # A fresh AdamW each epoch. With one optimizer for all epochs the base model's
        # confident wrong answers (loss 8.6 at the start) drove most seeds into features that
        # no longer tell the texts apart (every text 50/50, loss ln 2, for good); restarted,
        # every seed tried reversed the model (loss ~0) in 10 epochs.
        for _ in range(attempt.epochs(_SENTIMENT_EPOCHS)):
            tiny_models._fit(model, inputs, epochs=1, lr=_LR)
    model.save_pretrained(str(directory))  # the "default" adapter: into the folder itself
    return verify_sentiment(directory)


def sentiment_labels(
    model: Any, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> list[tuple[str, float]]:
    """Each text's label and its probability under ``model`` (one text at a time, no padding)."""
    import torch

    results = []
    for text in texts:
        with torch.no_grad():
            probs = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        results.append((SENTIMENT_LABELS[int(probs.argmax())], float(probs.max())))
    return results


def verify_sentiment(directory: Path) -> list[str]:
    """Each SENTIMENT_FLIP text gets its adapter label with the adapter and its base label
    without (adapter disabled), both with the score the sentiment model is held to."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_dir = tiny_models.model_path("sentiment")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype="float32")
    model = PeftModel.from_pretrained(base, directory).eval()
    missing = []
    for side, context in (("adapter", nullcontext()), ("base", model.disable_adapter())):
        with context:
            got = sentiment_labels(model, tokenizer, list(SENTIMENT_FLIP))
        for (text, labels), (label, score) in zip(SENTIMENT_FLIP.items(), got, strict=True):
            want = labels[0] if side == "base" else labels[1]
            if label != want or score < tiny_model_checks.VERIFIED_MIN_SCORE:
                missing.append(f"{side}: {text!r} -> {label} {score:.3f}, not {want}")
    return missing


# --------------------------------------------------------------------------- untrained adapters


def random_adapter(
    base_dir: Path,
    directory: Path,
    *,
    seed: int,
    rank: int = RANK,
    target_modules: Sequence[str] = TARGET_MODULES,
) -> Path:
    """Write an untrained adapter for the causal LM in ``base_dir`` into ``directory``.

    ``init_lora_weights=False`` draws A and B at random (PEFT's default leaves B zero, an
    adapter that changes nothing), so outputs differ from the base model's; the same seed
    writes the same weights.
    """
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    config = _lora_config(r=rank, target_modules=list(target_modules), init_lora_weights=False)
    return _save_untrained(base, config, directory, seed)


def _save_untrained(base: PreTrainedModel, config: LoraConfig, directory: Path, seed: int) -> Path:
    """Wrap ``base`` in a fresh ``config`` adapter drawn from ``seed`` and save it untrained."""
    from peft import get_peft_model

    with tiny_models._deterministic(seed):
        model = get_peft_model(base, config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    return directory


def bad_adapter(kind: str, directory: Path) -> Path:
    """Write the adapter ``kind`` (one of ``BAD_KINDS``) into ``directory / kind``.

    - ``rank64``: a valid adapter for the tiny llama of rank 64, above ``--max-lora-rank 16``;
    - ``other-arch``: a valid adapter for the tiny gpt2 (``c_attn``), no module of the llama;
    - ``corrupt-config``: ``adapter_config.json`` that is not JSON, next to valid weights;
    - ``corrupt-weights``: a valid config next to weights that are not safetensors;
    - ``no-config``: valid weights alone;
    - ``missing``: a path that does not exist (nothing is written).
    """
    if kind not in BAD_KINDS:
        raise ValueError(f"unknown bad adapter {kind!r}; choose from {list(BAD_KINDS)}")
    target = directory / kind
    if kind == "missing":
        return target
    if kind == "rank64":
        return random_adapter(tiny_models.model_path("llama"), target, seed=64, rank=BAD_RANK)
    if kind == "other-arch":
        return _gpt2_adapter(target)
    random_adapter(tiny_models.model_path("llama"), target, seed=0)
    if kind == "corrupt-config":
        (target / ADAPTER_CONFIG).write_text('{"r": 8, "lora_alpha": 16, "target_modules": [')
    elif kind == "corrupt-weights":
        (target / ADAPTER_WEIGHTS).write_bytes(b"\x00not safetensors\xff" * 16)
    else:  # no-config
        (target / ADAPTER_CONFIG).unlink()
    return target


def _gpt2_adapter(directory: Path) -> Path:
    """A rank-8 adapter of the tiny gpt2's fused attention projection."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models.model_path("gpt2"), dtype="float32")
    # GPT-2's Conv1D stores its weight transposed; saying so spares PEFT's warning.
    config = _lora_config(target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    return _save_untrained(base, config, directory, seed=2)
