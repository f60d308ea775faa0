"""``export_onnx``: the tiny trained encoders as Triton model repositories (docs/behaviour.md §6)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from _support.tiny_models import model_path
from lmserve_backend_hf import export as export_module
from lmserve_backend_hf.export import (
    ExportParityError,
    ExportReport,
    export_onnx,
    render_config_pbtxt,
)
from lmserve_core.errors import ConfigurationError
from lmserve_core.tasks import Task

# tiny model -> (task, output tensor, rank of the output)
CASES = {
    "sentiment": (Task.sequence_classification, "logits", 2),
    "ner": (Task.token_classification, "logits", 3),
    "masked_lm": (Task.fill_mask, "logits", 3),
    "embedding_mean": (Task.text_embedding, "last_hidden_state", 3),
}
NAMES = ["input_ids", "attention_mask"]
# Five texts, one much longer: another batch size and padded length than the export sample
# (two short texts), so running it proves both axes are dynamic.
TEXTS = [
    "I love this",
    "The capital of France is [MASK].",
    "Alice lives in Paris and works at Google",
    "ok",
    "Once upon a time Alice went from Paris to Berlin and Rome and Madrid and Tokyo and back "
    "again, and she loved all of it",
]


def _parse_pbtxt(text: str) -> object:
    """What Triton itself does with config.pbtxt: protobuf text format into ModelConfig."""
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _dtype(value: int) -> str:
    return pytest.importorskip("tritonclient.grpc.model_config_pb2").DataType.Name(value)


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[ExportReport, list[str]]]:
    """Export each tiny model once per module; returns the report and the progress lines."""
    repo = tmp_path_factory.mktemp("repo")
    done: dict[str, tuple[ExportReport, list[str]]] = {}

    def get(name: str) -> tuple[ExportReport, list[str]]:
        if name not in done:
            lines: list[str] = []
            report = export_onnx(model_path(name), CASES[name][0], NAMES, repo,
                                 model_name=name, max_batch_size=16, progress=lines.append)  # fmt: skip
            done[name] = (report, lines)
        return done[name]

    return get


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _tokenize(name: str, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path(name)))
    enc = tok(texts, padding=True, truncation=True, return_tensors="np", return_token_type_ids=True)
    return {n: enc[n].astype(np.int64) for n in names}


def _torch_output(name: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    from lmserve_backend_hf.loader import _model_class

    task, output, _ = CASES[name]
    model = _model_class(task).from_pretrained(str(model_path(name)), dtype=torch.float32)
    with torch.inference_mode():
        out = model.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()})
    return out[output].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_export_writes_a_triton_repository(name: str, exported) -> None:
    report, lines = exported(name)
    _task, output, rank = CASES[name]
    model_dir = report.config_path.parent
    assert report.onnx_path == model_dir / "1" / "model.onnx" and report.onnx_path.is_file()
    assert report.config_path == model_dir / "config.pbtxt" and model_dir.name == name
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # staging
    assert report.input_names == tuple(NAMES) and report.output_name == output
    assert report.max_abs_diff <= 1e-4 and report.exporter == "dynamo"

    text = report.config_path.read_text()
    assert f'name: "{name}"' in text
    assert 'platform: "onnxruntime_onnx"' in text
    assert "max_batch_size: 16" in text
    assert "dynamic_batching {" in text and "kind: KIND_CPU" in text
    config = _parse_pbtxt(text)
    assert config.name == name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == NAMES
    assert all(list(i.dims) == [-1] for i in config.input)
    assert {_dtype(i.data_type) for i in config.input} == {"TYPE_INT64"}
    (out,) = config.output
    assert out.name == output and _dtype(out.data_type) == "TYPE_FP32"
    # Without the batch axis: -1 for the sequence, the real size for the last axis.
    last = {"sentiment": 2, "ner": 7, "embedding_mean": 64}.get(name)
    expected_dims = [last] if rank == 2 else [-1, last]
    if name == "masked_lm":
        assert out.dims[0] == -1 and out.dims[1] > 100  # the vocabulary
    else:
        assert list(out.dims) == expected_dims
    assert list(out.dims) == list(report.output_dims)

    assert any(re.search(r"max abs diff \d\.\de[-+]\d\d", line) for line in lines), lines
    assert lines[0] == "importing torch and transformers ..."
    assert lines[-1].startswith("writing config.pbtxt: done (")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_has_dynamic_axes_and_matches_pytorch(name: str, exported) -> None:
    report, _ = exported(name)
    session = _session(report.onnx_path)
    assert [i.name for i in session.get_inputs()] == NAMES
    assert {i.type for i in session.get_inputs()} == {"tensor(int64)"}
    assert [o.name for o in session.get_outputs()] == [CASES[name][1]]

    batch = _tokenize(name, TEXTS, NAMES)
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"].shape[1] > 15
    (got,) = session.run(None, batch)
    want = _torch_output(name, batch)
    assert got.shape == want.shape and got.dtype == np.float32
    if got.ndim == 3:  # padding positions are nobody's output
        real = batch["attention_mask"].astype(bool)
        got, want = got[real], want[real]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_sentiment_onnx_logits_say_positive(exported) -> None:
    import json

    report, _ = exported("sentiment")
    id2label = json.loads((model_path("sentiment") / "config.json").read_text())["id2label"]
    batch = _tokenize("sentiment", ["I love this", "I hate this"], NAMES)
    (logits,) = _session(report.onnx_path).run(None, batch)
    assert [id2label[str(i)] for i in logits.argmax(-1)] == ["POSITIVE", "NEGATIVE"]


@pytest.mark.slow
def test_unknown_tensor_name_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"--tensor_input_names.*foo") as info:
        export_onnx(model_path("sentiment"), Task.sequence_classification,
                    ["input_ids", "foo"], tmp_path)  # fmt: skip
    assert info.value.param == "tensor_input_names"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_token_type_ids_are_an_input_when_asked(tmp_path: Path) -> None:
    names = ["input_ids", "token_type_ids", "attention_mask"]  # the given order is kept
    report = export_onnx(model_path("sentiment"), Task.sequence_classification, names, tmp_path)
    assert report.input_names == tuple(names) and report.config_path.parent.name == "model"
    session = _session(report.onnx_path)
    assert [i.name for i in session.get_inputs()] == names
    config = _parse_pbtxt(report.config_path.read_text())
    assert [i.name for i in config.input] == names
    batch = _tokenize("sentiment", TEXTS, names)
    batch["token_type_ids"][:, 3:] = 1  # would change nothing if the graph ignored it
    (got,) = session.run(None, batch)
    np.testing.assert_allclose(got, _torch_output("sentiment", batch), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_old_opset_goes_through_the_torchscript_exporter(tmp_path: Path) -> None:
    import onnx

    report = export_onnx(model_path("ner"), Task.token_classification, NAMES, tmp_path,
                         model_name="ner14", opset=14)  # fmt: skip
    assert report.exporter == "torchscript" and report.opset == 14
    assert max(o.version for o in onnx.load(str(report.onnx_path)).opset_import) == 14
    batch = _tokenize("ner", TEXTS, NAMES)
    (got,) = _session(report.onnx_path).run(None, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], _torch_output("ner", batch)[real], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_parity_failure_leaves_the_repository_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "_parity", lambda *_args: 0.5)
    with pytest.raises(ExportParityError, match=r"differ by 0\.5"):
        export_onnx(model_path("sentiment"), Task.sequence_classification, NAMES, tmp_path,
                    opset=17)  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no model folder, no staging leftovers


def test_generative_tasks_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    here = Path(".")
    with pytest.raises(ConfigurationError, match="--task text_generation") as info:
        export_onnx(here, Task.text_generation, NAMES, tmp_path)
    assert info.value.param == "task"
    for names, needle in (([], "empty"), (["attention_mask"], "input_ids"),
                          (["input_ids", "input_ids"], "repeats")):  # fmt: skip
        with pytest.raises(ConfigurationError, match=needle) as info:
            export_onnx(here, Task.fill_mask, names, tmp_path)
        assert info.value.param == "tensor_input_names"
    with pytest.raises(ConfigurationError, match="--max_batch_size") as info:
        export_onnx(here, Task.fill_mask, NAMES, tmp_path, max_batch_size=0)
    with pytest.raises(ConfigurationError, match="--model_name") as info:
        export_onnx(here, Task.fill_mask, NAMES, tmp_path, model_name="a/b")


def test_rendered_config_is_what_tritons_parser_reads() -> None:
    text = render_config_pbtxt("bert", ["input_ids", "attention_mask"], "logits", (-1, 9), 8)
    config = _parse_pbtxt(text)
    assert config.name == "bert" and config.max_batch_size == 8
    assert [list(i.dims) for i in config.input] == [[-1], [-1]]
    assert list(config.output[0].dims) == [-1, 9]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.instance_group[0].count == 1
