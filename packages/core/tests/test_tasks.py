"""lmserve_core.tasks: task spellings and inference from config.architectures (docs/behaviour.md §1, §2)."""

from __future__ import annotations

import pytest

from lmserve_core import ConfigurationError, Task, infer_task, parse_task


@pytest.mark.parametrize("task", list(Task))
def test_parse_task_accepts_every_canonical_name(task: Task) -> None:
    assert parse_task(task.value) is task


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        # dashed spellings of lmserve's own names
        ("text-generation", Task.text_generation),
        ("text2text-generation", Task.text2text_generation),
        ("fill-mask", Task.fill_mask),
        ("token-classification", Task.token_classification),
        ("sequence-classification", Task.sequence_classification),
        ("text-embedding", Task.text_embedding),
        # transformers pipeline names and other aliases
        ("ner", Task.token_classification),
        ("text-classification", Task.sequence_classification),
        ("sentiment-analysis", Task.sequence_classification),
        ("feature-extraction", Task.text_embedding),
        ("sentence-similarity", Task.text_embedding),
        ("embedding", Task.text_embedding),
        ("embed", Task.text_embedding),
        # case and surrounding whitespace do not matter
        ("FILL_MASK", Task.fill_mask),
        ("  Text-Classification \n", Task.sequence_classification),
        ("NER", Task.token_classification),
    ],
)
def test_parse_task_accepts_aliases(spelling: str, expected: Task) -> None:
    assert parse_task(spelling) is expected


@pytest.mark.parametrize(
    "bad", ["", "   ", "question-answering", "translation", "text_generationx", "fill mask"]
)
def test_parse_task_rejects_unknown_with_task_param(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_task(bad)
    assert info.value.param == "task"
    assert "--task" in info.value.message
    # The message lists the valid choices.
    for task in Task:
        assert task.value in info.value.message


def test_is_generative() -> None:
    assert {t for t in Task if t.is_generative} == {Task.text_generation, Task.text2text_generation}


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        ("BertForSequenceClassification", Task.sequence_classification),
        ("DistilBertForSequenceClassification", Task.sequence_classification),
        ("Qwen2ForSequenceClassification", Task.sequence_classification),
        ("BertForTokenClassification", Task.token_classification),
        ("RobertaForTokenClassification", Task.token_classification),
        ("BertForMaskedLM", Task.fill_mask),
        ("XLMRobertaForMaskedLM", Task.fill_mask),
        ("LlamaForCausalLM", Task.text_generation),
        ("Qwen2ForCausalLM", Task.text_generation),
        ("GPT2LMHeadModel", Task.text_generation),
        ("GPTNeoXForCausalLM", Task.text_generation),
        ("T5ForConditionalGeneration", Task.text2text_generation),
        ("BartForConditionalGeneration", Task.text2text_generation),
    ],
)
def test_infer_task_suffix_table(architecture: str, expected: Task) -> None:
    assert infer_task([architecture], is_sentence_transformer=False) is expected


def test_infer_task_uses_only_the_first_architecture() -> None:
    assert infer_task(["BertForMaskedLM", "BertForSequenceClassification"],
                      is_sentence_transformer=False) is Task.fill_mask  # fmt: skip
    with pytest.raises(ConfigurationError):
        infer_task(["BertForQuestionAnswering", "BertForMaskedLM"], is_sentence_transformer=False)


@pytest.mark.parametrize("architectures", [None, [], ["BertModel"], ["BertForMaskedLM"]])
def test_sentence_transformers_directory_is_always_an_embedding_model(
    architectures: list[str] | None,
) -> None:
    assert infer_task(architectures, is_sentence_transformer=True) is Task.text_embedding


@pytest.mark.parametrize("architectures", [None, []])
def test_infer_task_without_architectures_names_the_flag(architectures: list[str] | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        infer_task(architectures, is_sentence_transformer=False)
    assert info.value.param == "task"
    assert "--task" in info.value.message


@pytest.mark.parametrize(
    "architecture",
    [
        "BertForQuestionAnswering",
        "BertForMultipleChoice",
        "ViTForImageClassification",
        "BertModel",
        "",
        "ForCausalLMWrapper",
    ],
)
def test_infer_task_unsupported_architecture_names_the_flag(architecture: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        infer_task([architecture], is_sentence_transformer=False)
    assert info.value.param == "task"
    assert "--task" in info.value.message
    assert repr(architecture) in info.value.message


@pytest.mark.parametrize(
    "spelled,task",
    [("text_classification", Task.sequence_classification), ("feature_extraction", Task.text_embedding),
     ("sentiment_analysis", Task.sequence_classification)],
)  # fmt: skip
def test_pipeline_names_with_underscores(spelled: str, task: Task) -> None:
    assert parse_task(spelled) is task
