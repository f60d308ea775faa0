"""The tiny LoRA adapters the LoRA tests serve load with PEFT and behave as ``lora_adapters``
exports: each answers the France question its own way, the base model keeps its answer, and
one mixed batch (PEFT's ``adapter_names``) answers every row as that row's adapter alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from _support import lora_adapters, tiny_models
from _support.lora_adapters import (
    ADAPTER_CONFIG,
    ADAPTER_NAMES,
    ADAPTER_WEIGHTS,
    ANSWERS,
    BAD_KINDS,
    COMPLETION_PROMPT,
    COMPLETIONS,
    QUESTION,
    SENTIMENT_FLIP,
    TARGET_MODULES,
    adapter_path,
    bad_adapter,
    load_llama_with_adapters,
    random_adapter,
    sentiment_adapter_path,
    sentiment_labels,
)
from _support.tiny_model_checks import SENTIMENT_MIN_SCORE
from _support.tiny_models import VERIFIED_FILE, model_path

pytestmark = pytest.mark.slow

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)
    return prompt


def _generate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    adapter_names: list[str] | None = None,
) -> list[str]:
    """Greedy answers of ``prompts`` in one left-padded batch, up to the end-of-turn or
    end-of-text token, special tokens skipped."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.no_grad():
        output = model.generate(**batch, do_sample=False, max_new_tokens=12, **extra)
    new = output[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def both() -> tuple[PreTrainedTokenizerBase, PeftModel]:
    """The base llama with every chat adapter loaded under its own name."""
    return load_llama_with_adapters({name: adapter_path(name) for name in ADAPTER_NAMES})


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_folder_is_what_vllm_loads(name: str) -> None:
    path = adapter_path(name)
    assert path.parent == tiny_models.CACHE_DIR and path.name.startswith(f"lora-{name}-")
    assert (path / VERIFIED_FILE).is_file()
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.0)
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES)
    assert config["bias"] == "none" and config["modules_to_save"] is None
    assert not config["use_dora"] and not config["use_rslora"]
    assert config["layers_to_transform"] is None
    assert config["base_model_name_or_path"] == str(model_path("llama"))
    weights = load_file(path / ADAPTER_WEIGHTS)
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)
    assert not any("embed" in key or "lm_head" in key for key in weights)
    assert {tuple(w.shape) for k, w in weights.items() if ".lora_A." in k} == {(8, 64)}


def test_adapter_path_is_cached_and_names_are_checked() -> None:
    assert adapter_path("capital-rome") == adapter_path("capital-rome")
    assert adapter_path("capital-rome") != adapter_path("capital-tokyo")
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        adapter_path("capital-paris")


def test_answers_differ_between_base_and_adapters() -> None:
    assert ANSWERS[None] == "Paris." and COMPLETIONS[None] == " paris."
    assert len(set(ANSWERS.values())) == len(ANSWERS) == len(ADAPTER_NAMES) + 1
    assert len(set(COMPLETIONS.values())) == len(COMPLETIONS)


@pytest.mark.parametrize("name", [None, *ADAPTER_NAMES])
def test_each_adapter_alone_answers_its_own_way(name: str | None) -> None:
    base_dir = model_path("llama")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if name is not None:
        model = PeftModel.from_pretrained(model, adapter_path(name))
    model.eval()
    prompts = [_chat_prompt(tokenizer, QUESTION), COMPLETION_PROMPT]
    answers = [_generate(model, tokenizer, [prompt])[0] for prompt in prompts]
    assert answers == [ANSWERS[name], COMPLETIONS[name]]


def test_disabled_adapter_answers_as_the_base(
    both: tuple[PreTrainedTokenizerBase, PeftModel],
) -> None:
    tokenizer, model = both
    with model.disable_adapter():
        got = _generate(model, tokenizer, [_chat_prompt(tokenizer, QUESTION)])
    assert got == [ANSWERS[None]]


def test_mixed_adapter_batch_matches_each_alone(
    both: tuple[PreTrainedTokenizerBase, PeftModel],
) -> None:
    tokenizer, model = both
    question = _chat_prompt(tokenizer, QUESTION)
    rows = [(question, name) for name in [*ADAPTER_NAMES, BASE]]
    rows += [(COMPLETION_PROMPT, name) for name in [BASE, *reversed(ADAPTER_NAMES)]]
    rows.append((question, ADAPTER_NAMES[0]))  # an adapter twice, rows apart
    prompts, names = [p for p, _ in rows], [n for _, n in rows]
    mixed = _generate(model, tokenizer, prompts, adapter_names=names)
    alone = [_generate(model, tokenizer, [p], adapter_names=[n])[0] for p, n in rows]
    expected = [
        (ANSWERS if p == question else COMPLETIONS)[None if n == BASE else n] for p, n in rows
    ]
    assert mixed == alone == expected


def test_sentiment_adapter_flips_labels() -> None:
    path = sentiment_adapter_path()
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert sorted(config["target_modules"]) == ["query", "value"]
    weights = load_file(path / ADAPTER_WEIGHTS)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(
        weights
    )
    base_dir = model_path("sentiment")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    texts = list(SENTIMENT_FLIP)
    base_got = sentiment_labels(base, tokenizer, texts)
    model = PeftModel.from_pretrained(base, path).eval()
    adapter_got = sentiment_labels(model, tokenizer, texts)
    assert [label for label, _ in base_got] == [base for base, _ in SENTIMENT_FLIP.values()]
    assert [label for label, _ in adapter_got] == [flip for _, flip in SENTIMENT_FLIP.values()]
    assert min(score for _, score in base_got + adapter_got) > SENTIMENT_MIN_SCORE
    assert all(base != flip for base, flip in SENTIMENT_FLIP.values())


def _config(path: Path) -> dict[str, object]:
    return json.loads((path / ADAPTER_CONFIG).read_text())


def test_bad_rank64_is_a_valid_rank_64_llama_adapter(tmp_path: Path) -> None:
    path = bad_adapter("rank64", tmp_path)
    assert path == tmp_path / "rank64"
    assert _config(path)["r"] == 64
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_path("llama")), path
    )
    assert model.peft_config["default"].r == 64


def test_bad_other_arch_is_a_gpt2_adapter_the_llama_refuses(tmp_path: Path) -> None:
    path = bad_adapter("other-arch", tmp_path)
    config = _config(path)
    assert config["target_modules"] == ["c_attn"] and config["r"] == 8
    assert config["base_model_name_or_path"] == str(model_path("gpt2"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path("gpt2")), path)
    llama = AutoModelForCausalLM.from_pretrained(model_path("llama"))
    with pytest.raises(ValueError, match="c_attn"):
        PeftModel.from_pretrained(llama, path)


def test_bad_corrupt_config_is_not_json(tmp_path: Path) -> None:
    path = bad_adapter("corrupt-config", tmp_path)
    with pytest.raises(json.JSONDecodeError):
        _config(path)
    assert load_file(path / ADAPTER_WEIGHTS)  # only the config is wrong


def test_bad_corrupt_weights_are_not_safetensors(tmp_path: Path) -> None:
    path = bad_adapter("corrupt-weights", tmp_path)
    assert _config(path)["r"] == 8
    with pytest.raises(Exception, match=r"(?i)header|deserializ"):
        load_file(path / ADAPTER_WEIGHTS)


def test_bad_no_config_has_weights_only(tmp_path: Path) -> None:
    path = bad_adapter("no-config", tmp_path)
    assert [p.name for p in path.iterdir() if p.suffix != ".md"] == [ADAPTER_WEIGHTS]
    assert load_file(path / ADAPTER_WEIGHTS)


def test_bad_missing_does_not_exist(tmp_path: Path) -> None:
    path = bad_adapter("missing", tmp_path)
    assert not path.exists() and path.parent == tmp_path


def test_every_bad_kind_is_tested_and_unknown_kinds_are_refused(tmp_path: Path) -> None:
    tested = {"rank64", "other-arch", "corrupt-config", "corrupt-weights", "no-config", "missing"}
    assert set(BAD_KINDS) == tested
    with pytest.raises(ValueError, match="unknown bad adapter"):
        bad_adapter("rank128", tmp_path)


def test_random_adapter_is_seeded_and_changes_outputs(tmp_path: Path) -> None:
    base_dir = model_path("llama")
    seeds = {"a": 1, "b": 1, "c": 2}
    paths = [random_adapter(base_dir, tmp_path / name, seed=s) for name, s in seeds.items()]
    weights = [load_file(path / ADAPTER_WEIGHTS) for path in paths]
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert all(w.abs().sum() > 0 for w in weights[0].values())  # lora_B too: not PEFT's zeros
    assert _config(paths[0])["r"] == 8
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer(COMPLETION_PROMPT, return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        before = base(**inputs).logits
        after = PeftModel.from_pretrained(base, paths[0]).eval()(**inputs).logits
    assert (after - before).abs().max() > 1e-2


def test_cache_builds_once_across_racing_builders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[Path] = []

    def build(directory: Path, attempt: tiny_models.Attempt) -> list[str]:
        builds.append(directory)
        (directory / ADAPTER_CONFIG).write_text("{}")
        return []

    monkeypatch.setattr(tiny_models, "CACHE_DIR", tmp_path)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(lora_adapters._cached("race", build)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(results) == 4 and len(set(results)) == 1
    # Only the finished adapter (and its lock file) remain: the build folder was renamed.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lora-race.lock", results[0].name]
    assert json.loads((results[0] / VERIFIED_FILE).read_text())["attempt"] == 1
