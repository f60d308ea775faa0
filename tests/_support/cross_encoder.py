"""A tiny, trained cross-encoder (reranker) for the rerank tests, built locally at test time.

``cross_encoder_path()`` returns a folder that sentence-transformers loads as a ``CrossEncoder``
(written by ``CrossEncoder.save``: ``modules.json``, ``config_sentence_transformers.json`` with
``"model_type": "CrossEncoder"`` and the ``Sigmoid`` activation, ``sentence_bert_config.json``)
and transformers as a ``BertForSequenceClassification`` with one label (``num_labels`` 1,
``id2label`` ``{0: "LABEL_0"}``, no ``problem_type``; transformers 5 refuses
``single_label_classification`` with one label) and a lowercasing WordPiece tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``) trained on the corpus below. Sizes
are the tiny models' (``tiny_models._bert_config``): hidden 64, 2 heads, 2 layers, 64 positions,
``model_max_length`` 64.

Inputs are (query, passage) pairs in the tokenizer's pair encoding: ``[CLS] query [SEP] passage
[SEP]``, ``token_type_ids`` 0 for the query and its ``[SEP]``, 1 for the passage and the last
``[SEP]``. The score is the single logit; ``CrossEncoder.predict`` applies the sigmoid.

- ``RERANK_QUERIES`` maps each query to (relevant passages, irrelevant passages). Every relevant
  passage of a query scores above every other passage of the corpus (its irrelevant ones, the
  other queries' passages, ``LONG_PASSAGE``) for that query; relevant passages score above 0.5,
  every other passage below 0.5 (sigmoid). The scores saturate (about 0.998 and 0.001, the
  relevant passages of a query within 1e-5 of each other, their logits within 0.01), so the
  order among a query's relevant passages, or among its irrelevant ones, is float noise that
  another backend may flip: compare them as sets (or ``top_n`` >= the relevant count).
- ``LONG_PASSAGE`` is relevant to ``LONG_PASSAGE_QUERY``; the pair is longer than 64 tokens
  (``LONG_PAIR_TOKENS`` untruncated), so servers must truncate it (longest first: the passage
  loses its tail), and the truncated pair still scores above 0.5 and above that query's
  irrelevant passages.
- ``CrossEncoder(path).predict`` equals a plain ``AutoModelForSequenceClassification`` forward of
  the tokenizer's pair encoding (``truncation=True``) plus sigmoid within ``PREDICT_TOLERANCE``,
  so tests can compare a server with either.

The builder verifies all of this right after training with more room than tests assert
(``VERIFIED_RELEVANT`` / ``VERIFIED_IRRELEVANT``, so other kernels, padding and batch shapes do
not cross 0.5), trains again with the next ``tiny_models.ATTEMPTS`` when something is missing,
and caches the verified folder as ``<CACHE_DIR>/cross-encoder-rerank-<hash>`` (see
``verified_build``). The hash covers this file, ``verified_build``, the tiny models' builder hash
(the tokenizer and config helpers live there) and the library versions.

Training: every (query, passage) pair of the corpus, labelled 1 when the passage is one of the
query's relevant ones (so the other queries' relevant passages are its hard negatives), binary
cross-entropy on the single logit in a loop of its own (``BertForSequenceClassification``'s own
loss with one label and no ``problem_type`` is mean squared error, and sets ``problem_type``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from _support import tiny_models, verified_build
from _support.tiny_models import MAX_LENGTH, Attempt

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NAME = "rerank"

# query -> (relevant passages, irrelevant passages)
RERANK_QUERIES: dict[str, tuple[list[str], list[str]]] = {
    "What is the capital of France?": (
        [
            "Paris is the capital of France.",
            "The French government sits in Paris, its largest city.",
        ],
        [
            "Berlin is the capital of Germany.",
            "France is famous for its cheese and wine.",
            "Madrid is the largest city in Spain.",
        ],
    ),
    "Which animal is the largest mammal?": (
        [
            "The blue whale is the largest mammal on Earth.",
            "Blue whales can grow to thirty meters long.",
        ],
        [
            "Ants are small insects that live in colonies.",
            "Cats sleep for most of the day.",
            "Camels can walk for days in the desert without water.",
        ],
    ),
    "How long should I boil an egg?": (
        [
            "Boil an egg for about seven minutes for a firm yolk.",
            "A soft boiled egg needs five minutes in boiling water.",
            "Put the egg in boiling water and wait a few minutes.",
        ],
        [
            "Bake the bread in a hot oven.",
            "Chickens lay eggs on farms.",
            "Rice needs twenty minutes to cook.",
            "Slice the onions thinly before frying them.",
        ],
    ),
    "Will it rain in London tomorrow?": (
        [
            "Rain is expected in London tomorrow afternoon.",
            "Tomorrow brings heavy showers across London.",
        ],
        [
            "London is a large city in England.",
            "The sun shines in Madrid all summer.",
            "Umbrellas were invented long ago.",
        ],
    ),
    "Who won the football world cup in 2018?": (
        [
            "France won the 2018 football world cup.",
            "In 2018 the French team beat Croatia in the world cup final.",
        ],
        [
            "Tennis is played with a racket and a ball.",
            "The world cup takes place every four years.",
            "Basketball teams have five players on the court.",
        ],
    ),
}

LONG_PASSAGE_QUERY = "What is the capital of France?"
# Relevant from its first words; the tail (which truncation drops) only rambles on.
LONG_PASSAGE = (
    "Paris is the capital of France and its largest city, home to the French government, the "
    "president and the parliament. The city lies on the river Seine in the north of the "
    "country. Millions of people visit it every year to see its museums, its old churches, its "
    "wide avenues and its parks, and to eat in its many small restaurants and cafes, which stay "
    "open late into the night in every season of the year."
)
LONG_PAIR_TOKENS = 95  # tokens of (LONG_PASSAGE_QUERY, LONG_PASSAGE) untruncated, specials included

PREDICT_TOLERANCE = 1e-5
VERIFIED_RELEVANT = 0.8  # the builder's bar; tests assert > 0.5
VERIFIED_IRRELEVANT = 0.2  # the builder's bar; tests assert < 0.5

# Every relevant passage is a hard negative of each other query: repeated this often as a
# positive, the passage alone tells nothing, and the model must read the query.
_POSITIVE_REPEAT = len(RERANK_QUERIES) - 1
# Learning the query-passage match is a jump (the scores sit near a passage-only answer, then
# part). With gradients clipped at this rate, seeds 0-6 all jumped within 40 epochs; without
# clipping, or with mean squared error onto +-4 logits through tiny_models._fit, several never
# did in 60. At 50 epochs 9 of seeds 0-9 verified (relevant >= 0.978, others <= 0.024; seed 7
# did not), 9-14 s each on one thread of a busy two-core machine.
_EPOCHS = 50
_LR = 1e-3
_BATCH_SIZE = 16
_SHORT = 32  # tokens: every pair but the long passage's


def cross_encoder_path() -> Path:
    """The folder of the trained cross-encoder, built (and verified) on first use."""
    return verified_build.cached(_KIND, NAME, _build)


def relevant_passages(query: str) -> list[str]:
    """The passages relevant to ``query``: its own, plus ``LONG_PASSAGE`` for its query."""
    relevant = list(RERANK_QUERIES[query][0])
    return [*relevant, LONG_PASSAGE] if query == LONG_PASSAGE_QUERY else relevant


def all_passages() -> list[str]:
    """Every passage of the corpus, each once, ``LONG_PASSAGE`` last."""
    passages = [
        p for relevant, irrelevant in RERANK_QUERIES.values() for p in relevant + irrelevant
    ]
    return list(dict.fromkeys([*passages, LONG_PASSAGE]))


def labelled_pairs() -> list[tuple[str, str, int]]:
    """(query, passage, 1 if relevant else 0) for every query and every passage of the corpus."""
    return [
        (query, passage, int(passage in relevant_passages(query)))
        for query in RERANK_QUERIES
        for passage in all_passages()
    ]


# --------------------------------------------------------------------------- cache


_LIBRARIES = ("sentence-transformers", "torch", "transformers", "tokenizers", "safetensors")


def cross_encoder_hash() -> str:
    """Changes with this builder, its cache code, the tiny models' builder and the libraries."""
    return verified_build.source_hash(__file__, _LIBRARIES)


def _versions() -> dict[str, str]:
    return verified_build.versions(_LIBRARIES)


_KIND = verified_build.Kind(
    prefix="cross-encoder",
    description="cross-encoder",
    record_key="model",
    digest=cross_encoder_hash,
    versions=_versions,
)


# --------------------------------------------------------------------------- build


def _examples(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """The labelled pairs as right-padded pair encodings (truncated to 64 tokens, longest
    first) and float ``labels``; each positive repeated ``_POSITIVE_REPEAT`` times."""
    import torch

    rows = [row for row in labelled_pairs() for _ in range(_POSITIVE_REPEAT if row[2] else 1)]
    inputs = dict(
        tokenizer(
            [query for query, _, _ in rows],
            [passage for _, passage, _ in rows],
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
    )
    inputs["labels"] = torch.tensor([float(label) for *_, label in rows])
    return inputs


def _train(model: PreTrainedModel, examples: dict[str, torch.Tensor], *, epochs: int) -> None:
    """Binary cross-entropy on the single logit, AdamW, gradients clipped to norm 1.

    Each batch runs as two parts, rows of at most ``_SHORT`` tokens and longer rows (the long
    passage's), each cut to its longest row: the step of the whole batch without the compute of
    the short rows' padding.
    """
    import torch
    from torch.nn.functional import binary_cross_entropy_with_logits

    labels = examples["labels"]
    inputs = {key: value for key, value in examples.items() if key != "labels"}
    lengths = inputs["attention_mask"].sum(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LR)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(labels)).split(_BATCH_SIZE):
            short = lengths[rows] <= _SHORT
            for part in (rows[short], rows[~short]):
                if len(part):
                    width = int(lengths[part].max())
                    logits = model(**{k: v[part, :width] for k, v in inputs.items()}).logits[:, 0]
                    loss = binary_cross_entropy_with_logits(logits, labels[part], reduction="sum")
                    (loss / len(rows)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    model.eval()


def _build(directory: Path, attempt: Attempt) -> list[str]:
    """Train the cross-encoder, save it through sentence-transformers into ``directory`` and
    return what it misses (``verify``)."""
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    corpus = [*RERANK_QUERIES, *all_passages()]
    tokenizer = tiny_models._train_tokenizer(corpus, lowercase=True)
    examples = _examples(tokenizer)
    with tiny_models._deterministic(attempt.seed):
        config = tiny_models._bert_config(
            tokenizer,
            num_labels=1,
            architectures=["BertForSequenceClassification"],
        )
        model = BertForSequenceClassification(config)
        _train(model, examples, epochs=attempt.epochs(_EPOCHS))
    with tempfile.TemporaryDirectory(prefix="cross-encoder-hf-") as scratch:
        model.save_pretrained(scratch)
        tiny_models._save_tokenizer(tokenizer, Path(scratch), "Paris is the capital of France.")
        # Loaded from a plain transformers folder, sentence-transformers picks its defaults for
        # one label (the Sigmoid activation) and saves them with its own files.
        CrossEncoder(scratch, device="cpu", local_files_only=True).save(str(directory))
    tokenizer.backend_tokenizer.model.save(str(directory))  # vocab.txt, as real BERT folders
    return verify(directory)


# --------------------------------------------------------------------------- checks


def plain_scores(directory: Path, pairs: list[tuple[str, str]]) -> list[float]:
    """Sigmoid of the logit of a plain transformers forward, one pair at a time (no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype="float32").eval()
    scores = []
    for query, passage in pairs:
        inputs = tokenizer(query, passage, truncation=True, return_tensors="pt")
        with torch.no_grad():
            scores.append(float(model(**inputs).logits[0, 0].sigmoid()))
    return scores


def verify(directory: Path) -> list[str]:
    """What ``directory`` misses of the module docstring's promises, loaded back as tests load it."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoConfig, AutoTokenizer

    missing = _files_missing(directory)
    config = AutoConfig.from_pretrained(directory)
    shape = (config.num_labels, config.id2label, config.problem_type, config.architectures)
    if shape != (1, {0: "LABEL_0"}, None, ["BertForSequenceClassification"]):
        missing.append(f"config: num_labels, id2label, problem_type, architectures {shape}")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    long_pair = tokenizer(LONG_PASSAGE_QUERY, LONG_PASSAGE)
    if tokenizer.model_max_length != MAX_LENGTH or len(long_pair["input_ids"]) != LONG_PAIR_TOKENS:
        missing.append(
            f"tokenizer: model_max_length {tokenizer.model_max_length}, long pair "
            f"{len(long_pair['input_ids'])} tokens (want {MAX_LENGTH}, {LONG_PAIR_TOKENS})"
        )
    query_tokens = len(tokenizer(LONG_PASSAGE_QUERY)["input_ids"])
    types = long_pair["token_type_ids"]
    if types != [0] * query_tokens + [1] * (len(types) - query_tokens):
        missing.append(f"token_type_ids of a pair: {types}")

    model = CrossEncoder(str(directory), device="cpu", local_files_only=True)
    pairs = [(query, passage) for query, passage, _ in labelled_pairs()]
    scores = [float(s) for s in model.predict(pairs, batch_size=16)]
    by_pair = dict(zip(pairs, scores, strict=True))
    for query in RERANK_QUERIES:
        relevant = {p: by_pair[query, p] for p in relevant_passages(query)}
        others = {p: s for (q, p), s in by_pair.items() if q == query and p not in relevant}
        low = min(relevant, key=relevant.__getitem__)
        high = max(others, key=others.__getitem__)
        if relevant[low] < VERIFIED_RELEVANT or others[high] > VERIFIED_IRRELEVANT:
            missing.append(
                f"{query!r}: lowest relevant {low!r} {relevant[low]:.3f} (want >= "
                f"{VERIFIED_RELEVANT}), highest other {high!r} {others[high]:.3f} (want <= "
                f"{VERIFIED_IRRELEVANT})"
            )
    plain = plain_scores(directory, pairs)
    worst = max(abs(a - b) for a, b in zip(scores, plain, strict=True))
    if worst > PREDICT_TOLERANCE:
        missing.append(f"CrossEncoder.predict differs from a plain forward by {worst:.2e}")
    return missing


def _files_missing(directory: Path) -> list[str]:
    missing = []
    st_config = directory / "config_sentence_transformers.json"
    if st_config.is_file():
        saved = json.loads(st_config.read_text())
        want = ("CrossEncoder", "torch.nn.modules.activation.Sigmoid")
        if (saved.get("model_type"), saved.get("activation_fn")) != want:
            missing.append(f"config_sentence_transformers.json: {saved}")
    files = (
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    )
    missing += [f"no {name}" for name in files if not (directory / name).is_file()]
    return missing
