"""``lmserve export`` on the command line: flags, exit codes, the exporter entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _support.tiny_models import model_path
from lmserve_core.errors import BackendError, ConfigurationError
from lmserve_server import cli

ROOT = Path(__file__).resolve().parents[1]


def lmserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from lmserve_server.cli import main; main()", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_export_writes_the_repository_and_prints_the_difference(tmp_path: Path) -> None:
    # Pipeline spelling of the task and dashed flag spellings, as `serve` takes them.
    r = lmserve("export", "--model-dir", str(model_path("sentiment")), "--task", "text-classification",
                "--tensor-input-names", "input_ids,attention_mask", "--output", str(tmp_path),
                "--model-name", "sentiment", "--max-batch-size", "8")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "checking ONNX Runtime against PyTorch: max abs diff" in r.stderr
    assert (tmp_path / "sentiment" / "1" / "model.onnx").is_file()
    config = (tmp_path / "sentiment" / "config.pbtxt").read_text()
    assert 'name: "sentiment"' in config and "max_batch_size: 8" in config
    assert "wrote " in r.stdout and "max abs diff" in r.stdout
    # The tensor contract printed is the one Triton reads from the written config.pbtxt.
    printed = printed_contract(r.stdout)
    assert printed == pbtxt_contract(config), r.stdout
    assert printed == [
        ("input", "input_ids", "INT64", [-1, -1], [-1]),
        ("input", "attention_mask", "INT64", [-1, -1], [-1]),
        ("output", "logits", "FP32", [-1, 2], [2]),  # the two sentiment classes
    ]


Row = tuple[str, str, str, list[int], list[int]]
_ROW = re.compile(
    r"^\s+(input|output)\s+(\S+)\s+(\S+)\s+\[([-\d, ]*)\]\s+config\.pbtxt dims \[([-\d, ]*)\]$"
)


def printed_contract(stdout: str) -> list[Row]:
    """(kind, name, datatype, shape with the batch axis, config.pbtxt dims) per printed line."""

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.replace(" ", "").split(",") if v]

    return [(m[1], m[2], m[3], ints(m[4]), ints(m[5]))
            for m in map(_ROW.match, stdout.splitlines()) if m]  # fmt: skip


def pbtxt_contract(text: str) -> list[Row]:
    """The same rows from config.pbtxt as Triton parses it (protobuf text format into
    ModelConfig); Triton's metadata puts a -1 batch axis before dims when max_batch_size > 0."""
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    config = text_format.Parse(text, pb.ModelConfig())
    batch = [-1] if config.max_batch_size > 0 else []

    def row(kind: str, t: Any) -> Row:
        datatype = pb.DataType.Name(t.data_type).removeprefix("TYPE_")
        return (kind, t.name, datatype, [*batch, *t.dims], list(t.dims))

    return [row("input", t) for t in config.input] + [row("output", t) for t in config.output]


@pytest.mark.slow
def test_task_is_inferred_when_absent(tmp_path: Path) -> None:
    r = lmserve("export", "--model_dir", str(model_path("ner")),
                "--tensor_input_names", "input_ids,attention_mask", "--output", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "task token_classification" in r.stderr
    assert (tmp_path / "model" / "config.pbtxt").is_file()


@pytest.mark.slow
def test_unknown_tensor_name_exits_2_naming_the_flag(tmp_path: Path) -> None:
    r = lmserve("export", "--model_dir", str(model_path("sentiment")), "--task", "sequence_classification",
                "--tensor_input_names", "input_ids,foo", "--output", str(tmp_path))  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "--tensor_input_names" in r.stderr and "foo" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_flags_exit_2(tmp_path: Path) -> None:
    r = lmserve("export", "--model_dir", str(tmp_path), "--output", str(tmp_path))
    assert r.returncode == 2 and "--tensor_input_names" in r.stderr
    r = lmserve("export", "--tensor_input_names", "input_ids", "--output", str(tmp_path))
    assert r.returncode == 2 and "--model_dir" in r.stderr


@pytest.mark.parametrize(
    ("error", "code"),
    [(ConfigurationError("--opset 99 is not an ONNX opset", param="opset"), 2),
     (BackendError("ONNX Runtime and PyTorch differ by 0.5"), 1)],
)  # fmt: skip
def test_exit_codes_follow_the_error(
    error: Exception, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The server finds the exporter through the ``lmserve.exporters`` entry point."""
    seen: dict[str, Any] = {}
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")  # --task is given: nothing else is read

    def fake_export(*args: Any, **kwargs: Any) -> None:
        seen.update(args=args, kwargs=kwargs)
        raise error

    monkeypatch.setattr(cli, "_exporter", lambda name: fake_export if name == "onnx" else None)
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--model_dir", str(model), "--task", "ner",
                  "--tensor_input_names", "input_ids, attention_mask", "--output", str(tmp_path / "r"),
                  "--opset", "17"])  # fmt: skip
    assert info.value.code == code
    assert str(error) in capsys.readouterr().err
    model_dir, task, names, output = seen["args"]
    assert model_dir == model and task.value == "token_classification"
    assert [n.strip() for n in names] == ["input_ids", "attention_mask"]
    assert output == tmp_path / "r" and seen["kwargs"]["opset"] == 17
    assert seen["kwargs"]["model_name"] == "model" and seen["kwargs"]["max_batch_size"] == 32


def test_the_exporter_is_registered_as_an_entry_point() -> None:
    import importlib.metadata

    (ep,) = [
        e for e in importlib.metadata.entry_points(group="lmserve.exporters") if e.name == "onnx"
    ]
    assert ep.value == "lmserve_backend_hf.export:export_onnx"
