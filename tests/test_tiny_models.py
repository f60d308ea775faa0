"""The tiny test models load from disk with plain transformers and give the answers tests rely on."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from _support import tiny_models
from _support.tiny_model_checks import (
    FILL_MASK,
    NER_SENTENCE,
    NER_TAGS,
    SENTIMENT,
    SENTIMENT_MIN_SCORE,
)
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

ALL_MODELS = ["sentiment", "ner", "masked_lm", "embedding_mean", "embedding_cls"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_loads_offline_with_a_working_tokenizer(name: str) -> None:
    path = model_path(name)
    assert path.parent == tiny_models.CACHE_DIR
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 64, 2)
    assert config.hidden_size // config.num_attention_heads == 32  # vLLM CPU minimum head_dim
    assert config.max_position_embeddings == tokenizer.model_max_length == 64
    assert tokenizer.is_fast
    assert len(tokenizer) == config.vocab_size
    ids = tokenizer("Alice lives in Paris")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert (path / "vocab.txt").is_file()


def test_model_path_is_cached() -> None:
    assert model_path("sentiment") == model_path("sentiment")
    assert model_path("sentiment").name.startswith("sentiment-")


def test_unknown_model_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tiny model"):
        model_path("gpt-5")


def test_parallel_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # flock locks belong to open file descriptions, so threads that each open the lock file
    # exclude each other just as separate pytest processes do.
    builds: list[Path] = []
    real_build = tiny_models._BUILDERS["embedding_cls"]

    def counting_build(directory: Path, attempt: tiny_models.Attempt) -> None:
        builds.append(directory)
        real_build(directory, attempt)

    monkeypatch.setattr(tiny_models, "CACHE_DIR", tmp_path)
    monkeypatch.setitem(tiny_models._BUILDERS, "embedding_cls", counting_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(model_path("embedding_cls")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(set(results)) == 1 and len(results) == 4
    # Only the finished model (and its lock file) remain: the build directory was renamed.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".embedding_cls.lock", results[0].name]


@pytest.mark.parametrize(("text", "label"), SENTIMENT.items())
def test_sentiment(text: str, label: str) -> None:
    path = model_path("sentiment")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    with torch.no_grad():
        probs = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
    assert model.config.id2label[int(probs.argmax())] == label
    assert float(probs.max()) > SENTIMENT_MIN_SCORE


def test_ner_tags_people_places_and_organisations() -> None:
    path = model_path("ner")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path)
    words = NER_SENTENCE.split()
    encoding = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoding).logits.argmax(-1)[0].tolist()
    # The model is trained on the first sub-token of each word; read its tag there.
    tags: dict[int, str] = {}
    for position, word_index in enumerate(encoding.word_ids(0)):
        if word_index is not None and word_index not in tags:
            tags[word_index] = model.config.id2label[predicted[position]]
    assert [tags[i] for i in range(len(words))] == NER_TAGS


def test_ner_tokenizer_is_cased() -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path("ner"))
    assert tokenizer.tokenize("Alice Paris") == ["Alice", "Paris"]


@pytest.mark.parametrize(("text", "answer"), FILL_MASK.items())
def test_masked_lm_fills_capitals(text: str, answer: str) -> None:
    path = model_path("masked_lm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path)
    encoding = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoding).logits[0]
    mask_position = encoding["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    assert tokenizer.convert_ids_to_tokens(int(logits[mask_position].argmax())) == answer
    # Tied embeddings: the output projection is the input embedding matrix.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize(
    ("name", "pooling"), [("embedding_mean", "mean"), ("embedding_cls", "cls")]
)
def test_embedding_directory_is_a_sentence_transformers_model(name: str, pooling: str) -> None:
    path = model_path(name)
    modules = json.loads((path / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in modules] == [
        ("", "Transformer"),
        ("1_Pooling", "Pooling"),
        ("2_Normalize", "Normalize"),
    ]
    pooling_config = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling_config["word_embedding_dimension"] == 64
    assert pooling_config["pooling_mode_mean_tokens"] is (pooling == "mean")
    assert pooling_config["pooling_mode_cls_token"] is (pooling == "cls")
    assert json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert (path / "2_Normalize").is_dir() and not any((path / "2_Normalize").iterdir())
    assert AutoConfig.from_pretrained(path).architectures == ["BertModel"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("This is an example sentence.")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(path)(**tokenizer("hello", return_tensors="pt"))
    assert hidden.last_hidden_state.shape[-1] == 64


def test_embedding_models_differ_only_in_pooling() -> None:
    mean_path, cls_path = model_path("embedding_mean"), model_path("embedding_cls")
    mean_pooling = json.loads((mean_path / "1_Pooling" / "config.json").read_text())
    cls_pooling = json.loads((cls_path / "1_Pooling" / "config.json").read_text())
    assert mean_pooling != cls_pooling
    assert (mean_path / "model.safetensors").read_bytes() == (
        cls_path / "model.safetensors"
    ).read_bytes()


# --------------------------------------------------------------------------- the verified build


def _fake_build(directory: Path, attempt: tiny_models.Attempt) -> None:
    (directory / "seed.txt").write_text(str(attempt.seed))


def _learns_at(seed: int) -> object:
    """A stand-in for tiny_model_checks.verify: the model learns at ``seed`` and not before."""

    def verify(name: str, directory: Path) -> list[str]:
        got = int((directory / "seed.txt").read_text())
        return [] if got == seed else [f"'x' -> 'y': got 'z' (seed {got})"]

    return verify


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model named "fake" with one checked behaviour, built into an empty cache."""
    monkeypatch.setattr(tiny_models, "CACHE_DIR", tmp_path)
    monkeypatch.setitem(tiny_models._BUILDERS, "fake", _fake_build)
    behaviour = tiny_models.tiny_model_checks.Behaviour("'x' -> 'y'", lambda _: None)
    monkeypatch.setattr(tiny_models.tiny_model_checks, "behaviours", lambda name: [behaviour])
    return tmp_path


def test_a_model_that_misses_a_behaviour_trains_again(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_models.tiny_model_checks, "verify", _learns_at(seed=2))
    path = model_path("fake")
    record = json.loads((path / tiny_models.VERIFIED_FILE).read_text())
    assert (record["attempt"], record["seed"]) == (3, 2)
    assert record["checked"] == ["'x' -> 'y'"]
    assert (
        len(record["failed_attempts"]) == 2 and "got 'z' (seed 0)" in record["failed_attempts"][0]
    )
    assert (path / "seed.txt").read_text() == "2"
    assert [p.name for p in fake_model.iterdir() if not p.name.startswith(".")] == [path.name]


def test_a_model_that_never_learns_fails_naming_the_behaviour(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_models.tiny_model_checks, "verify", _learns_at(seed=99))
    with pytest.raises(tiny_models.TinyModelNotLearned, match=r"'x' -> 'y': got 'z'") as error:
        model_path("fake")
    assert f"in {len(tiny_models.ATTEMPTS)} attempts" in str(error.value)
    # Nothing was published, and no half-built folder is left behind.
    assert [p.name for p in fake_model.iterdir()] == [".fake.lock"]


def test_builds_of_an_older_builder_are_not_reused(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_models.tiny_model_checks, "verify", _learns_at(seed=0))
    older = fake_model / "fake-0123456789ab"  # another builder's hash
    older.mkdir()
    (older / tiny_models.VERIFIED_FILE).write_text("{}")
    unverified = fake_model / f"fake-{tiny_models.builder_hash()}"  # this hash, never verified
    unverified.mkdir()
    path = model_path("fake")
    assert path == unverified and (path / tiny_models.VERIFIED_FILE).is_file()
    assert not older.exists()  # pruned


def test_the_cache_key_follows_the_checks_and_the_training_libraries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = tiny_models.builder_hash()
    monkeypatch.setattr(tiny_models, "_versions", lambda: {"torch": "0.0.0"})
    assert tiny_models.builder_hash() != before
    monkeypatch.undo()
    checks = tmp_path / "tiny_model_checks.py"
    checks.write_text(Path(tiny_models.tiny_model_checks.__file__).read_text() + "# edited\n")
    monkeypatch.setattr(tiny_models.tiny_model_checks, "__file__", str(checks))
    assert tiny_models.builder_hash() != before


@pytest.mark.parametrize("name", ["sentiment", "ner", "masked_lm", "llama", "gpt2", "t5"])
def test_every_trained_model_was_verified_against_every_behaviour(name: str) -> None:
    record = json.loads((model_path(name) / tiny_models.VERIFIED_FILE).read_text())
    wanted = [b.description for b in tiny_models.tiny_model_checks.behaviours(name)]
    assert wanted and record["checked"] == wanted
    assert tiny_models.tiny_model_checks.verify(name, model_path(name)) == []
