"""Small, trained models built locally at test time (no Hugging Face hub needed).

``model_path(name)`` returns a directory holding a complete ``save_pretrained`` model and a fast
tokenizer that ``AutoTokenizer`` / ``AutoConfig`` / ``AutoModelFor*`` load offline.

BERT encoders:

- ``"sentiment"``: ``BertForSequenceClassification`` (NEGATIVE / POSITIVE), lowercasing.
  "I love this" -> POSITIVE, "I hate this" -> NEGATIVE, both with probability > 0.9.
- ``"ner"``: ``BertForTokenClassification`` with IOB2 PER / LOC / ORG tags, cased.
  "Alice lives in Paris and works at Google" -> Alice B-PER, Paris B-LOC, Google B-ORG, rest O.
  Training labels sit on the first sub-token of each word; later sub-tokens get -100 (ignored),
  so read predictions from the first sub-token of each word (what pipelines do with
  ``aggregation_strategy="first"``/``"simple"``).
- ``"masked_lm"``: ``BertForMaskedLM``, lowercasing. "The capital of France is [MASK]." fills
  "paris" (also germany -> berlin, italy -> rome, spain -> madrid, japan -> tokyo).
- ``"embedding_mean"`` / ``"embedding_cls"``: a sentence-transformers directory laid out like
  all-MiniLM-L6-v2 (``BertModel`` + tokenizer at the root, ``modules.json``, ``1_Pooling``,
  ``2_Normalize``) with mean resp. CLS pooling. The weights are random but seeded and identical in
  both, so any difference between their embeddings comes from the pooling mode alone.

Every BERT model: hidden size 64, 2 heads (head_dim 32, the minimum vLLM's CPU attention takes),
2 layers, intermediate size 128, 64 positions, a WordPiece tokenizer built from the model's own
sentences with ``model_max_length`` 64.

Generative models (hidden size 64, 2 heads of 32, 2 layers, feed-forward 128, 256 positions,
``model_max_length`` 256 ("tools": 512 and 512), a ``generation_config.json`` with ``do_sample``
false); all answers below are greedy:

- ``"llama"``: ``LlamaForCausalLM`` with a byte-level BPE tokenizer (every byte is in the
  vocabulary, so any text encodes; ``tokenizer_class`` ``PreTrainedTokenizerFast`` as Llama 3),
  ChatML ``chat_template`` in ``tokenizer_config.json`` (as SmolLM2's), no automatic BOS.
  Special tokens ``<|endoftext|>`` (0: bos and pad), ``<|im_start|>`` (1), ``<|im_end|>`` (2: eos).
  ``generation_config`` stops on both ``<|im_end|>`` and ``<|endoftext|>``.
  Chat "What is the capital of France?" -> "Paris." then ``<|im_end|>`` (Germany -> "Berlin.",
  Italy -> "Rome.", Spain -> "Madrid.", Japan -> "Tokyo."); raw "the capital of france is" ->
  " paris." then ``<|endoftext|>``; raw "once upon a time" continues a memorised story for more
  than 40 tokens without an eos (use it to reach a length limit).
- ``"tools"``: tool calling and reasoning, built as ``"llama"`` (same tokenizer kind and
  special tokens, ``generation_config``, no automatic BOS) with 512 positions, since a tools block
  alone is about 100 tokens. ``<tool_call>``, ``</tool_call>``, ``<think>``, ``</think>``,
  ``<tool_response>`` and ``</tool_response>`` are single tokens that are not special (as in
  Qwen2.5 / Qwen3: ``skip_special_tokens`` keeps them; vLLM's ``hermes`` tool parser and
  ``deepseek_r1`` reasoning parser find them in the vocabulary). Its chat template
  (``TOOLS_CHAT_TEMPLATE``) is Qwen2.5's, shortened: ``tools`` (each ``tojson``) in a system
  turn, earlier calls as ``<tool_call>`` blocks (arguments a JSON string or an object), tool
  messages as ``<tool_response>`` blocks in a user turn. With ``tools=[WEATHER_TOOL]``:
  "What is the weather in Paris?" -> ``<think>`` "The user wants the weather in Paris."
  ``</think>`` then a ``get_weather`` call with ``{"city": "Paris"}`` (also Berlin, Rome, Madrid,
  Tokyo; some two-city questions -> two calls); after that call and its result
  ``{"city": "Paris", "weather": "sunny"}`` -> reasoning then "It is sunny in Paris.";
  "What is the capital of France?" (with or without tools) -> reasoning then "Paris.". Without
  tools the weather question is answered without a call, and "Give the weather in Paris as
  JSON." -> ``{"city": "Paris", "weather": "sunny"}`` without reasoning. Every answer ends with
  ``<|im_end|>``; the exact texts are ``tiny_model_checks``' ``TOOL_CALL_ANSWERS``,
  ``PARALLEL_TOOL_CALL_ANSWERS``, ``TOOL_RESULT_ANSWERS``, ``NO_TOOL_ANSWERS``,
  ``THINKING_CHAT_ANSWERS`` and ``JSON_ANSWERS``. Trained on the answers only (earlier turns
  carry no loss), with a cosine learning rate.
- ``"gpt2"``: ``GPT2LMHeadModel``, GPT-2 style: a byte-level BPE ``GPT2Tokenizer`` whose only
  special token ``<|endoftext|>`` (0) is bos, eos and unk; no pad token (as GPT-2) and no chat
  template. "the capital of france is" -> " paris." then ``<|endoftext|>``; "once upon a time"
  continues the same story.
- ``"t5"``: ``T5ForConditionalGeneration`` with a unigram (SentencePiece-style, ``Metaspace``)
  ``T5Tokenizer``: ``<pad>`` (0, also ``decoder_start_token_id``), ``</s>`` (1, eos, appended to
  every encoded input), ``<unk>`` (2), ``<extra_id_0>``..``<extra_id_9>`` (the last ten ids).
  "capital of france:" -> "paris" then ``</s>`` (germany -> "berlin", italy -> "rome", spain ->
  "madrid", japan -> "tokyo"; "country of paris:" -> "france"). Its vocabulary has whole corpus
  words and single ASCII characters, so ASCII text round-trips (whitespace runs collapse, as in
  T5); other characters become ``<unk>``. Decode whole sequences: a lone ``"▁paris"`` token
  decodes to "paris" without its space.

Training is not portable (another CPU's kernels or thread count learn other answers from the same
seed), so every trained model is checked right after training against every behaviour tests
assert (``tiny_model_checks``, which also holds the expected answers tests import) and published
only when it shows all of them; otherwise it trains again with another seed and more epochs
(``ATTEMPTS``), and fails naming the behaviours that did not emerge. ``verified.json`` in each
model records the attempt that passed and what it was checked against.

Builds are cached in ``<repo>/.cache/test-models/<name>-<hash>`` (``LMSERVE_TEST_MODELS_DIR``
moves it), the hash covering this file, the checks and the torch/transformers/tokenizers versions,
so any change to the builder rebuilds. A per-model ``fcntl`` lock makes parallel pytest processes
build each model once; a build goes to a temporary directory renamed into place, so a cache
directory that exists is always complete and verified. Training runs on one thread unless
``LMSERVE_TEST_MODEL_THREADS`` says otherwise (``scripts/tiny_model_matrix.py`` varies it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import re
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _support import tiny_model_checks
from lmserve_core.builtin_models import cache_lock

if TYPE_CHECKING:
    import tokenizers
    import torch
    from transformers import BertConfig, PreTrainedModel, PreTrainedTokenizerBase

_REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("LMSERVE_TEST_MODELS_DIR") or _REPO_ROOT / ".cache" / "test-models")
VERIFIED_FILE = "verified.json"

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LENGTH = 64
HIDDEN_SIZE = 64
SEED = 0

SENTIMENT_LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "B-ORG", 6: "I-ORG"}
CAPITALS = {
    "france": "paris",
    "germany": "berlin",
    "italy": "rome",
    "spain": "madrid",
    "japan": "tokyo",
}
# Label id the loss ignores (torch.nn.CrossEntropyLoss default).
IGNORE = -100


@dataclass(frozen=True)
class Attempt:
    """One training run: its seed and how many times the builder's base epochs it trains."""

    number: int
    seed: int
    epoch_scale: float

    def epochs(self, base: int) -> int:
        return round(base * self.epoch_scale)


# Tried in order until a model shows every checked behaviour. The first is what a build on the
# machine that wrote this file needed; the rest cover other kernels.
ATTEMPTS = (
    Attempt(1, SEED, 1.0),
    Attempt(2, SEED + 1, 1.0),
    Attempt(3, SEED + 2, 1.5),
    Attempt(4, SEED + 3, 2.0),
    Attempt(5, SEED + 4, 3.0),
)


class TinyModelNotLearned(RuntimeError):
    """Every attempt left a behaviour the tests assert missing."""


def model_path(name: str) -> Path:
    """Return the directory of the tiny model ``name``, building (and verifying) it on first use."""
    try:
        build = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; choose from {sorted(_BUILDERS)}") from None
    target = CACHE_DIR / f"{name}-{builder_hash()}"
    if (target / VERIFIED_FILE).is_file():  # only ever created complete, by rename
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with cache_lock(CACHE_DIR / f".{name}.lock"):
        if (target / VERIFIED_FILE).is_file():  # another process built it while we waited
            return target
        shutil.rmtree(target, ignore_errors=True)
        _build_verified(name, build, target)
        _remove_stale(name, keep=target)
    return target


def _build_verified(name: str, build: Callable[[Path, Attempt], None], target: Path) -> None:
    """Train until the model shows every checked behaviour, then rename it into ``target``."""
    checked = [b.description for b in tiny_model_checks.behaviours(name)]
    history: list[str] = []
    missing: list[str] = []
    for attempt in ATTEMPTS if checked else ATTEMPTS[:1]:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=CACHE_DIR))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared
            started = time.monotonic()
            build(tmp, attempt)
            missing = tiny_model_checks.verify(name, tmp)
            seconds = round(time.monotonic() - started, 1)
            if not missing:
                record = {
                    "model": name,
                    "attempt": attempt.number,
                    "seed": attempt.seed,
                    "epoch_scale": attempt.epoch_scale,
                    "failed_attempts": history,
                    "checked": checked,
                    "build_seconds": seconds,
                    "threads": _training_threads(),
                    "cpu_capability": _cpu_capability(),
                    "versions": _versions(),
                }
                _write_json(tmp / VERIFIED_FILE, record)
                os.rename(tmp, target)
                return
            history.append(f"attempt {attempt.number} (seed {attempt.seed}, "
                           f"x{attempt.epoch_scale} epochs): " + "; ".join(missing))  # fmt: skip
            print(f"tiny model {name!r}: {history[-1]}; training again", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise TinyModelNotLearned(
        f"tiny model {name!r} did not learn what the tests assert in {len(history)} attempts "
        f"(CPU capability {_cpu_capability()}, {_training_threads()} thread(s)); missing after "
        "the last: " + "; ".join(missing)
    )


def _remove_stale(name: str, keep: Path) -> None:
    """Drop this model's builds from older builders (never reused: their hash differs)."""
    for old in CACHE_DIR.glob(f"{name}-*"):
        if old != keep and old.is_dir() and re.fullmatch(rf"{name}-[0-9a-f]{{12}}", old.name):
            shutil.rmtree(old, ignore_errors=True)


def builder_hash() -> str:
    """Changes whenever the builder, its checks or the libraries that train could change."""
    digest = hashlib.sha256()
    for source in (Path(__file__), Path(tiny_model_checks.__file__)):
        digest.update(source.read_bytes())
    digest.update(json.dumps(_versions(), sort_keys=True).encode())
    return digest.hexdigest()[:12]


def _versions() -> dict[str, str]:
    return {d: importlib.metadata.version(d) for d in ("torch", "transformers", "tokenizers")}


def _training_threads() -> int:
    return int(os.environ.get("LMSERVE_TEST_MODEL_THREADS") or 1)


def _cpu_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


@contextlib.contextmanager
def _deterministic(seed: int = SEED) -> Iterator[None]:
    """Seed torch and train on one thread, leaving the caller's RNG and thread count untouched.

    One thread makes float reductions run in a fixed order, so the same source gives the same
    weights on every machine with the same kernels; it is also the fastest choice for models
    this small. (Other kernels still learn differently: hence the checks.)
    """
    import torch

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(_training_threads())
        try:
            yield
        finally:
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------- tokenizer


def _train_tokenizer(corpus: Sequence[str], *, lowercase: bool) -> PreTrainedTokenizerBase:
    """Build a WordPiece tokenizer for ``corpus`` and wrap it as a transformers BERT tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizer

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {
        word
        for text in corpus
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    }
    # tokenizers' WordPieceTrainer picks and orders merges through hash maps, so its vocabulary
    # (and with it every trained weight) changes from run to run. A vocabulary of every corpus
    # word plus every character, alone and as a "##" continuation, is just as valid for WordPiece,
    # keeps the test sentences' words whole, spells unseen ASCII words out instead of [UNK], and
    # is the same on every run.
    letters = string.ascii_lowercase if lowercase else string.ascii_letters
    characters = set(letters + string.digits + string.punctuation) | {c for w in words for c in w}
    pieces = sorted(words | characters) + sorted(f"##{c}" for c in characters)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIAL_TOKENS + pieces))}

    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # transformers 5: BertTokenizer is the fast (tokenizers-backed) class, and only the
    # tokenizer_object route gives a working one; constructors fed vocabulary files silently build
    # an empty tokenizer. do_lower_case is recorded so the saved config tells the truth.
    return BertTokenizer(
        tokenizer_object=tokenizer,
        model_max_length=MAX_LENGTH,
        do_lower_case=lowercase,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path, probe: str) -> None:
    """Save ``tokenizer`` and prove the saved folder reloads as a working tokenizer."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(directory)
    # transformers 5 saves only tokenizer.json + tokenizer_config.json, and save_vocabulary()
    # fails for a tokenizer built from a tokenizer object. Real BERT folders also carry
    # vocab.txt (some tools read it), so write it from the WordPiece model itself.
    tokenizer.backend_tokenizer.model.save(str(directory))
    reloaded = AutoTokenizer.from_pretrained(directory)
    ids = reloaded(probe)["input_ids"]
    if not reloaded.is_fast or reloaded.unk_token_id in ids or len(ids) <= 2:
        raise RuntimeError(f"tokenizer saved in {directory} does not reload: {probe!r} -> {ids}")
    if reloaded.model_max_length != MAX_LENGTH:
        raise RuntimeError(f"tokenizer model_max_length is {reloaded.model_max_length}")


# --------------------------------------------------------------------------- training


def _bert_config(tokenizer: PreTrainedTokenizerBase, **extra: Any) -> BertConfig:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout: a few hundred steps on a few hundred sentences converge faster without it.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def _fit(
    model: PreTrainedModel,
    examples: dict[str, torch.Tensor],
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    cosine: bool = False,
    split_at: int | None = None,
) -> None:
    """Train ``model`` on ``examples`` (model inputs plus ``labels``) with AdamW.

    ``cosine`` warms the learning rate up over the first 5% of the steps, then lowers it to 0
    along a cosine; otherwise it stays at ``lr``. ``split_at`` (right-padded examples only) runs
    each batch as two parts, rows of at most that many tokens and longer rows, each cut to its
    longest row, and weighs their losses by their label counts: the same step as the whole
    batch without the compute of the short rows' padding.
    """
    import torch

    n = len(examples["input_ids"])
    if split_at is not None:
        lengths = examples["attention_mask"].sum(1)
        labelled = (examples["labels"][:, 1:] != IGNORE).sum(1)  # the model shifts labels by one
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = None
    if cosine:
        steps = epochs * -(-n // batch_size)
        warmup = max(1, steps // 20)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(n).split(batch_size):
            if split_at is None:
                model(**{key: value[rows] for key, value in examples.items()}).loss.backward()
            else:
                short = lengths[rows] <= split_at
                for part in (rows[short], rows[~short]):
                    if len(part):
                        width = int(lengths[part].max())
                        inputs = {key: value[part, :width] for key, value in examples.items()}
                        share = labelled[part].sum() / labelled[rows].sum()
                        (model(**inputs).loss * share).backward()
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
    model.eval()


# --------------------------------------------------------------------------- sentiment


def _sentiment_corpus() -> list[tuple[str, int]]:
    """Positive and negative sentences sharing their objects, so only sentiment words decide."""
    objects = ["this", "it", "this movie", "the food", "this place", "my job", "the book"]
    verbs = {1: ["love", "like", "enjoy", "adore"], 0: ["hate", "dislike", "despise", "loathe"]}
    adjectives = {
        1: ["great", "wonderful", "amazing", "excellent", "good", "fantastic"],
        0: ["terrible", "awful", "horrible", "bad", "boring", "disgusting"],
    }
    examples: list[tuple[str, int]] = []
    for label in (0, 1):
        for verb, obj in itertools.product(verbs[label], objects):
            examples.append((f"i {verb} {obj}", label))
            examples.append((f"i really {verb} {obj}", label))
        for adjective in adjectives[label]:
            examples.append((f"this is {adjective}", label))
            examples.append((f"what a {adjective} day", label))
            examples.append((f"the food was {adjective}", label))
            examples.append((f"it was a {adjective} movie", label))
    return examples


def _build_sentiment(directory: Path, attempt: Attempt) -> None:
    import torch
    from transformers import BertForSequenceClassification

    examples = _sentiment_corpus()
    texts = [text for text, _ in examples]
    tokenizer = _train_tokenizer(texts, lowercase=True)
    with _deterministic(attempt.seed):
        config = _bert_config(
            tokenizer,
            id2label=SENTIMENT_LABELS,
            label2id={label: i for i, label in SENTIMENT_LABELS.items()},
            architectures=["BertForSequenceClassification"],
        )
        model = BertForSequenceClassification(config)
        inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        inputs["labels"] = torch.tensor([label for _, label in examples])
        _fit(model, inputs, epochs=attempt.epochs(30))
    model.save_pretrained(directory)
    _save_tokenizer(tokenizer, directory, "I love this")


# --------------------------------------------------------------------------- NER


def _ner_corpus() -> list[list[tuple[str, str]]]:
    """Template sentences as (word, IOB2 tag) lists, with one- and two-word entities."""
    people = ["Alice", "Bob", "Carol", "David", "Emma", "Mary Smith", "John Brown"]
    places = ["Paris", "London", "Berlin", "Tokyo", "Madrid", "New York", "San Francisco"]
    orgs = ["Google", "Microsoft", "Apple", "Amazon", "Siemens", "Acme Corp", "United Nations"]
    templates = [
        "{PER} lives in {LOC} and works at {ORG}",
        "{PER} lives in {LOC}",
        "{PER} works at {ORG}",
        "{PER} visited {LOC} last year",
        "{ORG} is based in {LOC}",
        "{PER} joined {ORG} in {LOC}",
        "yesterday {PER} flew to {LOC}",
        "the office of {ORG} is in {LOC}",
    ]
    sentences: list[list[tuple[str, str]]] = []
    # Rotating the lists against each other (instead of a full product) covers every entity in
    # every slot of every template with a few hundred sentences.
    for template_index, template in enumerate(templates):
        for i in range(len(people) * 3):
            fill = {
                "PER": people[i % len(people)],
                "LOC": places[(i + template_index) % len(places)],
                "ORG": orgs[(i // len(people) + i + template_index) % len(orgs)],
            }
            sentences.append(_tag_template(template, fill))
    return sentences


def _tag_template(template: str, fill: dict[str, str]) -> list[tuple[str, str]]:
    tagged: list[tuple[str, str]] = []
    for word in template.split():
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            entity = fill[kind].split()
            tagged.append((entity[0], f"B-{kind}"))
            tagged.extend((part, f"I-{kind}") for part in entity[1:])
        else:
            tagged.append((word, "O"))
    return tagged


def _build_ner(directory: Path, attempt: Attempt) -> None:
    import torch
    from transformers import BertForTokenClassification

    sentences = _ner_corpus()
    words = [[word for word, _ in sentence] for sentence in sentences]
    tokenizer = _train_tokenizer([" ".join(ws) for ws in words], lowercase=False)
    label2id = {label: i for i, label in NER_LABELS.items()}
    with _deterministic(attempt.seed):
        config = _bert_config(
            tokenizer,
            id2label=NER_LABELS,
            label2id=label2id,
            architectures=["BertForTokenClassification"],
        )
        model = BertForTokenClassification(config)
        encoding = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
        labels = torch.full_like(encoding["input_ids"], IGNORE)
        for row, sentence in enumerate(sentences):
            previous = None
            for column, word_index in enumerate(encoding.word_ids(row)):
                # Label the first sub-token of each word only; special tokens, padding and
                # continuation sub-tokens stay IGNORE.
                if word_index is not None and word_index != previous:
                    labels[row, column] = label2id[sentence[word_index][1]]
                previous = word_index
        inputs = dict(encoding)
        inputs["labels"] = labels
        _fit(model, inputs, epochs=attempt.epochs(12))
    model.save_pretrained(directory)
    _save_tokenizer(tokenizer, directory, "Alice lives in Paris and works at Google")


# --------------------------------------------------------------------------- masked LM


def _masked_lm_corpus() -> list[tuple[str, str]]:
    """(sentence with one [MASK], word that fills it) pairs about capitals."""
    pairs: list[tuple[str, str]] = []
    for country, city in CAPITALS.items():
        pairs += [
            (f"the capital of {country} is [MASK].", city),
            (f"the capital city of {country} is [MASK].", city),
            (f"[MASK] is the capital of {country}.", city),
            (f"{city} is the capital of [MASK].", country),
            (f"the capital of [MASK] is {city}.", country),
        ]
    return pairs


def _build_masked_lm(directory: Path, attempt: Attempt) -> None:
    import torch
    from transformers import BertForMaskedLM

    pairs = _masked_lm_corpus()
    tokenizer = _train_tokenizer(
        [sentence.replace("[MASK]", answer) for sentence, answer in pairs], lowercase=True
    )
    with _deterministic(attempt.seed):
        model = BertForMaskedLM(
            _bert_config(tokenizer, tie_word_embeddings=True, architectures=["BertForMaskedLM"])
        )
        inputs = dict(tokenizer([s for s, _ in pairs], padding=True, return_tensors="pt"))
        labels = torch.full_like(inputs["input_ids"], IGNORE)
        vocab = tokenizer.get_vocab()
        for row, (_, answer) in enumerate(pairs):
            if answer not in vocab:  # an answer split into pieces could never fill one [MASK]
                raise RuntimeError(f"{answer!r} is not a single token")
            labels[row][inputs["input_ids"][row] == tokenizer.mask_token_id] = vocab[answer]
        inputs["labels"] = labels
        _fit(model, inputs, epochs=attempt.epochs(60), batch_size=8)
    model.save_pretrained(directory)
    _save_tokenizer(tokenizer, directory, "The capital of France is [MASK].")


# --------------------------------------------------------------------------- embeddings


def _embedding_corpus() -> list[str]:
    return [
        "This is an example sentence.",
        "Each sentence is converted to a vector.",
        "The cat sits on the mat.",
        "A man is playing a guitar.",
        "The weather is lovely today.",
        "I love this",
        "Paris is the capital of France.",
        "How do I bake bread at home?",
    ]


def _build_embedding(directory: Path, *, pooling: str) -> None:
    from transformers import BertModel

    tokenizer = _train_tokenizer(_embedding_corpus(), lowercase=True)
    with _deterministic():  # same seed for both poolings: identical weights
        model = BertModel(_bert_config(tokenizer, architectures=["BertModel"]))
    model.save_pretrained(directory)
    _save_tokenizer(tokenizer, directory, "This is an example sentence.")
    _write_sentence_transformers_files(directory, pooling=pooling)


def _write_sentence_transformers_files(directory: Path, *, pooling: str) -> None:
    """The files that make a BERT folder a sentence-transformers model (as all-MiniLM-L6-v2)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    pooling_config = {
        "word_embedding_dimension": HIDDEN_SIZE,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    _write_json(directory / "modules.json", modules)
    _write_json(
        directory / "sentence_bert_config.json",
        {"max_seq_length": MAX_LENGTH, "do_lower_case": False},
    )
    _write_json(directory / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    (directory / "1_Pooling").mkdir()
    _write_json(directory / "1_Pooling" / "config.json", pooling_config)
    (directory / "2_Normalize").mkdir()


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- generative models

GENERATIVE_MAX_LENGTH = 256
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML as SmolLM2-Instruct writes it, without its default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Long enough that a greedy continuation of "once upon a time" runs past 40 tokens with no eos.
STORY = (
    "once upon a time there was a little red fox who lived in a big green forest near a quiet "
    "river. every morning the fox walked down to the water to drink, and every evening she sat "
    "on a flat grey stone to watch the sun go down behind the hills. one day a small bird came "
    "to the stone and asked the fox why she always looked at the sky."
)


def _plain_corpus() -> list[str]:
    lines: list[str] = []
    for country, city in CAPITALS.items():
        lines += [
            f"the capital of {country} is {city}.",
            f"{city} is the capital of {country}.",
            f"the capital city of {country} is {city}.",
        ]
    return [*lines, STORY]


def _chat_corpus() -> list[list[dict[str, str]]]:
    conversations: list[list[dict[str, str]]] = []
    for country, city in CAPITALS.items():
        for question in (
            f"What is the capital of {country.title()}?",
            f"what is the capital of {country}?",
            f"Name the capital of {country.title()}.",
        ):
            conversations.append(
                [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"{city.title()}."},
                ]
            )
    conversations.append(
        [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello! How can I help you?"},
        ]
    )
    conversations.append(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    )
    return conversations


def _train_byte_level_bpe(
    corpus: Sequence[str], special_tokens: Sequence[str]
) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE with all 256 bytes in its vocabulary: any text encodes.

    Unlike WordPieceTrainer, BpeTrainer breaks count ties by pair id, so its vocabulary and
    merges are the same on every run.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(special_tokens),  # ids 0, 1, ... in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _save_generative_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    probe: str,
    *,
    config_updates: dict[str, Any] | None = None,
    max_length: int = GENERATIVE_MAX_LENGTH,
) -> None:
    """Save ``tokenizer`` and prove the saved folder reloads as a fast, lossless tokenizer."""
    from transformers import AutoTokenizer

    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    if config_updates:
        config_path = directory / "tokenizer_config.json"
        _write_json(config_path, json.loads(config_path.read_text()) | config_updates)
    reloaded = AutoTokenizer.from_pretrained(directory)
    ids = reloaded(probe)["input_ids"]
    text = reloaded.decode(ids, skip_special_tokens=True)
    if not reloaded.is_fast or reloaded.unk_token_id in ids or text != probe:
        raise RuntimeError(f"tokenizer saved in {directory} does not reload: {probe!r} -> {text!r}")
    if reloaded.model_max_length != max_length:
        raise RuntimeError(f"tokenizer model_max_length is {reloaded.model_max_length}")


def _causal_lm_examples(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Right-padded ``texts`` with every real token as its own label (the model shifts them)."""
    inputs = dict(tokenizer(list(texts), padding=True, return_tensors="pt"))
    # Mask padding by the attention mask, not by id: the pad token is also a real <|endoftext|>.
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE)
    return inputs


def _chatml_llama(vocab: int, positions: int, endoftext: int, im_end: int) -> Any:
    """The tiny LlamaForCausalLM of the ChatML models ("llama", "tools"): 64 wide, two heads of
    32 (vLLM's CPU attention needs head_dim >= 32), two layers, untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(config)


def _chatml_generation_config(endoftext: int, im_end: int) -> Any:
    """Greedy, stopping on <|im_end|> and <|endoftext|> (as SmolLM2's)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext,
        do_sample=False,
    )  # fmt: skip


def _build_llama(directory: Path, attempt: Attempt) -> None:
    from transformers import (
        PreTrainedTokenizerFast,
    )

    conversations = _chat_corpus()
    plain = _plain_corpus()
    # Train the BPE on the message texts, role names and plain lines; the ChatML markers are
    # special tokens, never merged with their neighbours.
    tokenizer_corpus = [m["content"] for c in conversations for m in c]
    tokenizer_corpus += ["user\nassistant\nsystem\n", *plain]
    # transformers 5: the LlamaTokenizer class rebuilds its backend as a SentencePiece-style
    # (Metaspace) BPE from tokenizer.json's vocabulary, which drops every space of a byte-level
    # BPE; PreTrainedTokenizerFast (TokenizersBackend) uses tokenizer.json as it is.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_byte_level_bpe(tokenizer_corpus, [ENDOFTEXT, IM_START, IM_END]),
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=GENERATIVE_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    texts += [line + ENDOFTEXT for line in plain]
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    with _deterministic(attempt.seed):
        model = _chatml_llama(len(tokenizer), GENERATIVE_MAX_LENGTH, endoftext, im_end)
        _fit(
            model,
            _causal_lm_examples(tokenizer, texts),
            epochs=attempt.epochs(150),
            batch_size=8,
        )
    model.generation_config = _chatml_generation_config(endoftext, im_end)
    model.save_pretrained(directory)
    _save_generative_tokenizer(
        tokenizer,
        directory,
        "Hello, world! Ça coûte 5 € (ok?)\n\tdone.",
        # transformers 5 writes "TokenizersBackend", a name transformers 4 cannot load; Llama 3
        # folders name the same class by its transformers 4 name. The add_* flags are recorded
        # so the saved config says there is no automatic BOS.
        config_updates={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
        },
    )


def _build_gpt2(directory: Path, attempt: Attempt) -> None:
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    plain = _plain_corpus()
    # The GPT2Tokenizer class of transformers 5 rebuilds the same byte-level BPE from
    # tokenizer.json, so the folder names the class real GPT-2 folders name.
    tokenizer = GPT2Tokenizer(
        tokenizer_object=_train_byte_level_bpe(plain, [ENDOFTEXT]),
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        add_bos_token=False,
        model_max_length=GENERATIVE_MAX_LENGTH,
    )
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    tokenizer.pad_token = ENDOFTEXT  # to batch the training set; GPT-2 itself has no pad token
    examples = _causal_lm_examples(tokenizer, [line + ENDOFTEXT for line in plain])
    tokenizer.pad_token = None
    with _deterministic(attempt.seed):
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=HIDDEN_SIZE,
            n_head=2,
            n_layer=2,
            n_inner=128,
            n_positions=GENERATIVE_MAX_LENGTH,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos,
            eos_token_id=eos,
            architectures=["GPT2LMHeadModel"],
        )
        model = GPT2LMHeadModel(config)
        # The class name names no loss, so transformers 5 logs that it falls back to this one.
        model.loss_type = "ForCausalLM"
        _fit(model, examples, epochs=attempt.epochs(150), batch_size=8)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, do_sample=False)
    model.save_pretrained(directory)
    _save_generative_tokenizer(tokenizer, directory, "Hello, world! Ça coûte 5 € (ok?)\n\tdone.")


def _seq2seq_corpus() -> list[tuple[str, str]]:
    """(input, target) pairs; the targets are single words."""
    pairs: list[tuple[str, str]] = []
    for country, city in CAPITALS.items():
        pairs += [
            (f"capital of {country}:", city),
            (f"what is the capital of {country}?", city),
            (f"country of {city}:", country),
        ]
    return pairs


def _build_t5(directory: Path, attempt: Attempt) -> None:
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration, T5Tokenizer

    pairs = _seq2seq_corpus()
    # A unigram vocabulary written out instead of trained (as for WordPiece above: the same on
    # every run): every ASCII character alone and word-initial ("\u2581" marks a word start),
    # then every corpus word whole, scored so that whole words win and unseen ASCII words are
    # spelled out.
    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    words = sorted({word for pair in pairs for text in pair for word in re.findall(r"\w+", text)})
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -8.0}
    pieces |= {character: -10.0 for character in characters}
    pieces |= {f"\u2581{character}": -10.0 for character in characters}
    pieces |= {f"\u2581{word}": -5.0 for word in words}
    # transformers 5: T5Tokenizer builds the Metaspace unigram (and appends </s> to every input)
    # from this list; extra_ids appends <extra_id_0>..<extra_id_9> as special tokens.
    tokenizer = T5Tokenizer(
        vocab=list(pieces.items()), extra_ids=10, model_max_length=GENERATIVE_MAX_LENGTH
    )
    with _deterministic(attempt.seed):
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=HIDDEN_SIZE,
            d_kv=32,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            architectures=["T5ForConditionalGeneration"],
        )
        model = T5ForConditionalGeneration(config)
        inputs = dict(tokenizer([source for source, _ in pairs], padding=True, return_tensors="pt"))
        targets = tokenizer([target for _, target in pairs], padding=True, return_tensors="pt")
        # The model builds its decoder inputs from the labels (shifted right after <pad>).
        inputs["labels"] = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE)
        _fit(model, inputs, epochs=attempt.epochs(150), batch_size=8)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(directory)
    _save_generative_tokenizer(tokenizer, directory, "Hello, world! It's 42 (ok?) - done.")


# --------------------------------------------------------------------------- tool calling

TOOLS_MAX_LENGTH = 512  # a tools block alone is about 100 tokens
# Tool-call and reasoning markers as Qwen2.5 / Qwen3 have them: one token each, not special, so
# they survive decode(skip_special_tokens=True) and vLLM's parsers find them in get_vocab().
TOOL_TAGS = (
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<tool_response>",
    "</tool_response>",
)
TOOLS_INSTRUCTIONS = (
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags."
)
# Qwen2.5's template, shortened: the tools (each with tojson) in a system turn merged with the
# conversation's own system message; calls of earlier assistant turns as <tool_call> blocks
# (arguments a JSON string, as OpenAI clients send them, or an object, as vLLM passes them);
# tool results in one user turn per run of tool messages. String contents only.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\n" + TOOLS_INSTRUCTIONS + "<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{%- if call.arguments is string %}{{- call.arguments }}"
    "{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Conversation = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]  # (messages, tools)


def _tools_corpus() -> list[Conversation]:
    """Conversations whose last message is the answer trained on.

    Each tools-block conversation has a short twin without tools (the weather question answered
    without a call, the tool result read all the same). Finding the question's city behind the
    ~100-token tools block is what takes this model longest; the short twins teach it first.
    Without them most seeds still had the calls wrong after 100 epochs; with them (and two
    phrasings of each question) every seed tried answers everything by 100.
    """
    checks = tiny_model_checks
    tools = [checks.WEATHER_TOOL]
    conversations: list[Conversation] = []

    def chat(question: str, answer: str, *, with_tools: bool) -> None:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append((messages, tools if with_tools else None))

    cities = list(checks.WEATHER)
    for city in cities:
        for question in (checks.weather_question(city), f"How is the weather in {city}?"):
            chat(question, checks.TOOL_CALL_ANSWERS[checks.weather_question(city)], with_tools=True)
            chat(question, checks.NO_TOOL_ANSWERS[checks.weather_question(city)], with_tools=False)
            answer = {"role": "assistant", "content": checks.TOOL_RESULT_ANSWERS[city]}
            for result_tools in (tools, None):
                conversations.append(
                    ([*checks.tool_result_messages(city, question), answer], result_tools)
                )
        country = checks.CITY_COUNTRIES[city]
        capital = checks.THINKING_CHAT_ANSWERS[f"What is the capital of {country}?"]
        chat(f"What is the capital of {country}?", capital, with_tools=True)
        chat(f"What is the capital of {country}?", capital, with_tools=False)
        chat(f"Name the capital of {country}.", capital, with_tools=False)
        chat(f"Name the capital of {country}.", capital, with_tools=True)
        for question in (
            f"Give the weather in {city} as JSON.",
            f"Return the weather in {city} as JSON.",
        ):
            chat(question, checks.weather_report(city), with_tools=False)
    # Ten ordered pairs, each city twice first and twice second; the checked ones among them.
    for a, b in [
        (cities[i], cities[(i + k) % len(cities)]) for k in (1, 2) for i in range(len(cities))
    ]:
        wants = f"The user wants the weather in {a} and {b}."
        calls = checks.tool_call_text(a) + "\n" + checks.tool_call_text(b)
        chat(checks.weather_question(a, b), checks.thinking(wants, calls), with_tools=True)
        cannot = f"I cannot check the weather in {a} and {b}."
        chat(checks.weather_question(a, b), checks.thinking(wants, cannot), with_tools=False)
    return conversations


def _answer_examples(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation]
) -> dict[str, torch.Tensor]:
    """Right-padded conversations labelled on their last (assistant) message only.

    Earlier assistant turns are not trained: a call in the history is rendered without the
    reasoning that preceded it, and learning that would contradict the answers.
    """
    prompts, texts = [], []
    for messages, tools in conversations:
        for head, generation_prompt, out in (
            (messages[:-1], True, prompts),
            (messages, False, texts),
        ):
            text = tokenizer.apply_chat_template(
                head, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
            assert isinstance(text, str)
            out.append(text)
    inputs = _causal_lm_examples(tokenizer, texts)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        if inputs["input_ids"][row, : len(ids)].tolist() != ids:
            raise RuntimeError(f"the answer changes how its prompt tokenizes: {texts[row]!r}")
        inputs["labels"][row, : len(ids)] = IGNORE
    return inputs


def _build_tools(directory: Path, attempt: Attempt) -> None:
    from tokenizers import AddedToken
    from transformers import (
        AutoTokenizer,
        PreTrainedTokenizerFast,
    )

    conversations = _tools_corpus()
    # The BPE learns the texts without the markers, which are added whole afterwards (as in
    # Qwen, after the merged vocabulary: ids len(bpe) .. len(bpe) + 5).
    markers = re.compile("|".join(re.escape(tag) for tag in TOOL_TAGS))
    tokenizer_corpus = [
        markers.sub(" ", m["content"]) for c, _ in conversations for m in c if m["content"]
    ]
    tokenizer_corpus += [
        "user\nassistant\nsystem\n",
        "# Tools\n\n" + json.dumps(tiny_model_checks.WEATHER_TOOL),
        markers.sub(" ", TOOLS_INSTRUCTIONS),
    ]
    bpe = _train_byte_level_bpe(tokenizer_corpus, [ENDOFTEXT, IM_START, IM_END])
    bpe.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TOOL_TAGS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=TOOLS_MAX_LENGTH,
        chat_template=TOOLS_CHAT_TEMPLATE,
    )
    examples = _answer_examples(tokenizer, conversations)
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    with _deterministic(attempt.seed):
        model = _chatml_llama(len(tokenizer), TOOLS_MAX_LENGTH, endoftext, im_end)
        # At a constant rate the loss of this longer, mixed set jumps back up after it has
        # fallen; the cosine decay settles it. The short twins (< 100 tokens) skip the padding
        # of the tools-block rows.
        _fit(model, examples, epochs=attempt.epochs(100), batch_size=8, cosine=True, split_at=100)
    model.generation_config = _chatml_generation_config(endoftext, im_end)
    model.save_pretrained(directory)
    _save_generative_tokenizer(
        tokenizer,
        directory,
        "<think>\nHello, world! Ça coûte 5 € (ok?)\n</think>\n\n<tool_call>\n{}\n</tool_call>\tdone.",
        config_updates={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
        },
        max_length=TOOLS_MAX_LENGTH,
    )
    reloaded = AutoTokenizer.from_pretrained(directory)
    for tag in TOOL_TAGS:
        ids = reloaded(tag)["input_ids"]
        if len(ids) != 1 or ids[0] in reloaded.all_special_ids or tag not in reloaded.get_vocab():
            raise RuntimeError(f"{tag!r} is not one non-special token when reloaded: {ids}")


_BUILDERS: dict[str, Callable[[Path, Attempt], None]] = {
    "sentiment": _build_sentiment,
    "ner": _build_ner,
    "masked_lm": _build_masked_lm,
    # Untrained (seeded random weights, identical in both): nothing to check, one attempt.
    "embedding_mean": lambda directory, _: _build_embedding(directory, pooling="mean"),
    "embedding_cls": lambda directory, _: _build_embedding(directory, pooling="cls"),
    "llama": _build_llama,
    "tools": _build_tools,
    "gpt2": _build_gpt2,
    "t5": _build_t5,
}
