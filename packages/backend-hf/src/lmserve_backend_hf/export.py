"""``lmserve export``: an encoder model as a Triton model repository (docs/behaviour.md §6).

``export_onnx`` is the ``lmserve.exporters`` entry point named ``onnx``. It writes::

    OUTPUT/MODEL_NAME/config.pbtxt
    OUTPUT/MODEL_NAME/1/model.onnx

The ONNX graph takes exactly the named tokenizer outputs (INT64, dynamic batch and sequence
axes) and returns one FP32 tensor: ``logits`` for the classification and fill-mask tasks and
for rerank (a cross-encoder's sequence-classification graph: one logit per pair, [N, 1], to
which lmserve applies the CrossEncoder's activation), ``last_hidden_state`` for embeddings
(lmserve pools and normalises it itself, as for the torch backend). A reranker is exported and
checked on (query, document) pairs; one whose tokenizer marks the document with token type 1
must take ``token_type_ids`` (``triton_contract.reranker_needs_token_types``). Before anything
lands in OUTPUT, ONNX Runtime is run against PyTorch on a batch of another size and length than
the export sample; a difference above ``PARITY_ATOL`` (over real tokens: padding positions of
per-token outputs are not compared) raises ``ExportParityError`` and leaves OUTPUT/MODEL_NAME
untouched.

torch and transformers are imported inside the functions: the entry point is only loaded
when a user exports, and importing this module must stay cheap like the rest of the package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmserve_backend_hf.onnxruntime_extra import import_onnxruntime
from lmserve_backend_hf.triton_contract import (
    DYNAMIC,
    TritonTensor,
    config_data_type,
    describe_tensors,
    missing_token_types,
    reranker_needs_token_types,
    token_inputs,
)
from lmserve_core.errors import BackendError, ConfigurationError
from lmserve_core.model_files import config_max_length
from lmserve_core.tasks import Task, parse_task

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "EXPORT_TASKS",
    "PARITY_ATOL",
    "ExportParityError",
    "ExportReport",
    "export_onnx",
    "render_config_pbtxt",
]

logger = logging.getLogger(__name__)

# The one output tensor each task's graph returns.
EXPORT_TASKS: dict[Task, str] = {
    Task.sequence_classification: "logits",
    Task.token_classification: "logits",
    Task.fill_mask: "logits",
    Task.text_embedding: "last_hidden_state",
    Task.rerank: "logits",
}
PARITY_ATOL = 1e-4
# The torch.export-based exporter writes opset 18 and newer; asked for less it silently
# writes 18, so older opsets go to the TorchScript exporter.
_DYNAMO_MIN_OPSET = 18
# Protobuf cannot hold more than 2 GiB: bigger graphs keep their weights in a side file.
_EXTERNAL_DATA_BYTES = 1_500_000_000

# The export sample (two short texts) and the check batch (another size, a longer text) have
# different shapes, so the parity check also proves the batch and sequence axes are dynamic.
_EXPORT_TEXTS = ("I love this", "I hate this so much")
_CHECK_TEXTS = (
    "The capital of France is {mask}.",
    "Alice lives in Paris and works at Google",
    "hi",
    "Once upon a time a very long sentence went on and on, about Paris and Berlin and Rome "
    "and Madrid and Tokyo, about love and hate and everything in between, until {mask} ended.",
)
# A reranker's: (query, document) pairs, so both token types (and a truncated document) are
# part of the parity check.
_EXPORT_PAIRS = (("I love this", "I hate this so much"), ("where is paris", "in france"))
_CHECK_PAIRS = (
    ("What is the capital of France?", "Paris is the capital of France."),
    ("hi", "hello"),
    ("Alice lives in Paris", "and works at Google"),
    ("Once upon a time", " ".join([_CHECK_TEXTS[3].replace("{mask}", "it")] * 4)),
)


class ExportParityError(BackendError):
    """ONNX Runtime and PyTorch disagree on the exported graph (an exporter bug, not a flag)."""


@dataclass(frozen=True)
class ExportReport:
    onnx_path: Path
    config_path: Path
    input_names: tuple[str, ...]
    output_name: str
    output_dims: tuple[int, ...]  # as in config.pbtxt: without the batch axis, -1 = sequence
    max_abs_diff: float
    seconds: float
    exporter: str  # "dynamo" (torch.export) or "torchscript"
    opset: int
    max_batch_size: int = 32

    @property
    def inputs(self) -> tuple[TritonTensor, ...]:
        """The graph's inputs as Triton's model metadata shows them (batch axis included)."""
        return token_inputs(self.input_names)

    @property
    def outputs(self) -> tuple[TritonTensor, ...]:
        return (_output_tensor(self.output_name, self.output_dims),)

    def describe_tensors(self) -> list[str]:
        """What ``lmserve export`` prints: the tensors Triton will see, as written to
        config.pbtxt (docs/behaviour.md §6), for a Triton operator to check."""
        model = self.config_path.parent.name
        return [
            f'Triton model "{model}" (max_batch_size {self.max_batch_size}): shapes as Triton\'s '
            "model metadata shows them, batch axis first, -1 = dynamic",
            *(f"  {line}" for line in describe_tensors(self.inputs, self.outputs,
                                                       self.max_batch_size)),
        ]  # fmt: skip


def export_onnx(
    model_dir: Path,
    task: Task,
    tensor_input_names: list[str],
    output: Path,
    model_name: str = "model",
    max_batch_size: int = 32,
    opset: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export ``model_dir`` for ``task`` to ``output/model_name`` and check it (docs/behaviour.md §6)."""
    started = time.perf_counter()
    steps = _Steps(progress or (lambda _msg: None))
    model_dir, output = Path(model_dir), Path(output)
    task = task if isinstance(task, Task) else parse_task(str(task))
    names = _check_arguments(task, tensor_input_names, output, model_name, max_batch_size, opset)
    output_name = EXPORT_TASKS[task]

    with steps.step("importing torch and transformers"):
        import torch  # noqa: F401  (the first import takes seconds: show it as its own step)
        import transformers  # noqa: F401
    with _quiet_transformers():
        with steps.step("loading tokenizer"):
            tokenizer = _load_tokenizer(model_dir, task, names)
        if task is Task.rerank:
            _check_reranker(model_dir, tokenizer, names)
        with steps.step("loading model") as note:
            model = _load_model(model_dir, task)
            note.result = f"{type(model).__name__}, {_parameter_count(model) / 1e6:.1f}M parameters"
    _check_forward_accepts(model, names)
    wrapper = _make_wrapper(model, names, output_name)
    max_length = _max_length(tokenizer, model)
    sample: Sequence[str | tuple[str, str]] = (
        _EXPORT_PAIRS if task is Task.rerank else _EXPORT_TEXTS
    )
    check: Sequence[str | tuple[str, str]] = _CHECK_PAIRS if task is Task.rerank else _CHECK_TEXTS
    export_sample = _tokenize(tokenizer, sample, names, max_length)
    check_batches = [
        _tokenize(tokenizer, check, names, max_length),
        _tokenize(tokenizer, check[2:3], names, max_length),  # batch 1 too
        export_sample,
    ]
    output_dims = _config_dims(tuple(_run_torch(wrapper, export_sample).shape))

    output.mkdir(parents=True, exist_ok=True)
    # Everything is built in a staging folder inside OUTPUT (same file system, so the final
    # moves are renames) and moved into place only once ONNX Runtime agrees with PyTorch.
    staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.export-", dir=output))
    try:
        staged_onnx = staging / "model.onnx"
        with steps.step("exporting ONNX") as note:
            exporter, written_opset = _export(
                wrapper, export_sample, names, output_name, staged_onnx, opset, steps
            )
            size = sum(f.stat().st_size for f in staging.iterdir())
            note.result = f"{exporter} exporter, opset {written_opset}, {size / 1e6:.1f} MB"
        with steps.step("checking ONNX Runtime against PyTorch") as note:
            diff = _parity(wrapper, staged_onnx, check_batches)
            note.result = f"max abs diff {diff:.1e}"
        if not diff <= PARITY_ATOL:  # NaN fails too
            raise ExportParityError(
                f"ONNX Runtime and PyTorch differ by {diff:.3g} (limit {PARITY_ATOL:g}) on "
                f"{model_dir}; {output / model_name} was left as it was"
            )
        with steps.step("writing config.pbtxt"):
            config_text = render_config_pbtxt(
                model_name, names, output_name, output_dims, max_batch_size
            )
            (staging / "config.pbtxt").write_text(config_text, encoding="utf-8")
            onnx_path, config_path = _install(staging, output / model_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(
        onnx_path=onnx_path,
        config_path=config_path,
        input_names=tuple(names),
        output_name=output_name,
        output_dims=output_dims,
        max_abs_diff=diff,
        seconds=time.perf_counter() - started,
        exporter=exporter,
        opset=written_opset,
        max_batch_size=max_batch_size,
    )


def render_config_pbtxt(
    model_name: str,
    input_names: Sequence[str],
    output_name: str,
    output_dims: Sequence[int],
    max_batch_size: int,
) -> str:
    """Triton's ``ModelConfig`` in protobuf text format, written by hand (no protobuf needed).

    With ``max_batch_size`` > 0 Triton adds the batch axis itself, so ``dims`` leave it out:
    inputs are ``[ -1 ]`` (the sequence), the output is the model's shape after the batch axis.
    """

    def block(tensor: TritonTensor) -> str:
        dims = "[ " + ", ".join(str(d) for d in tensor.config_dims(max_batch_size)) + " ]"
        return (
            f"  {{\n    name: {_quote(tensor.name)}\n"
            f"    data_type: {config_data_type(tensor.datatype)}\n    dims: {dims}\n  }}"
        )

    # The same TritonTensor values ExportReport.describe_tensors prints.
    inputs = token_inputs(input_names)
    output = _output_tensor(output_name, output_dims)
    return (
        "# Written by `lmserve export` (docs/behaviour.md §6).\n"
        f"name: {_quote(model_name)}\n"
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n" + ",\n".join(block(t) for t in inputs) + "\n]\n"
        "output [\n" + block(output) + "\n]\n"
        # No preferred sizes or queue delay: like lmserve's own batcher, Triton then batches
        # whatever queued up while the model was busy.
        "dynamic_batching { }\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    )


def _output_tensor(name: str, dims: Sequence[int]) -> TritonTensor:
    """The graph's one FP32 output: ``dims`` (config.pbtxt's, no batch axis) behind the batch."""
    return TritonTensor(name, "FP32", (DYNAMIC, *dims))


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


# -- arguments -------------------------------------------------------------------------------


def _check_arguments(
    task: Task,
    tensor_input_names: Sequence[str],
    output: Path,
    model_name: str,
    max_batch_size: int,
    opset: int | None,
) -> list[str]:
    if task not in EXPORT_TASKS:
        raise ConfigurationError(
            f"lmserve export supports the encoder tasks ({', '.join(t.value for t in EXPORT_TASKS)}), "
            f"not --task {task.value}",
            param="task",
        )
    names = [n.strip() for n in tensor_input_names if n.strip()]
    if not names:
        raise ConfigurationError(
            "--tensor_input_names is empty; name the tokenizer outputs the graph takes, "
            "e.g. input_ids,attention_mask",
            param="tensor_input_names",
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigurationError(
            f"--tensor_input_names repeats {', '.join(duplicates)}", param="tensor_input_names"
        )
    if "input_ids" not in names:
        raise ConfigurationError(
            f"--tensor_input_names must include input_ids (got {','.join(names)})",
            param="tensor_input_names",
        )
    if not model_name or model_name in (".", "..") or "/" in model_name or os.sep in model_name:
        raise ConfigurationError(
            f"--model_name {model_name!r} cannot be a Triton model directory name",
            param="model_name",
        )
    if max_batch_size < 1:
        raise ConfigurationError(
            f"--max_batch_size must be at least 1 (got {max_batch_size}); the graph has a "
            "dynamic batch axis",
            param="max_batch_size",
        )
    if opset is not None and not 7 <= opset <= 30:
        raise ConfigurationError(f"--opset {opset} is not an ONNX opset", param="opset")
    if output.exists() and not output.is_dir():
        raise ConfigurationError(f"--output {str(output)!r} is not a directory", param="output")
    return names


# -- loading ---------------------------------------------------------------------------------


def _load_tokenizer(model_dir: Path, task: Task, names: Sequence[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise ConfigurationError(
            f"cannot load the tokenizer from {str(model_dir)!r}: {exc}", param="model_dir"
        ) from exc
    produced = list(getattr(tokenizer, "model_input_names", None) or [])
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise ConfigurationError(
            f"--tensor_input_names: {', '.join(unknown)} "
            f"{'is not an output' if len(unknown) == 1 else 'are not outputs'} of this "
            f"model's tokenizer, which produces {', '.join(produced)}",
            param="tensor_input_names",
        )
    if task is Task.fill_mask and tokenizer.mask_token is None:
        raise ConfigurationError("fill_mask needs a tokenizer with a mask token", param="task")
    return tokenizer


def _check_reranker(model_dir: Path, tokenizer: Any, names: Sequence[str]) -> None:
    """One logit (as serving checks), and token types among the inputs when the model reads
    them: the parity check cannot catch their absence (PyTorch is run without them too)."""
    from lmserve_core.model_files import check_reranker, read_model_config

    config = read_model_config(model_dir)
    check_reranker(config, str(model_dir))
    pair_types = tokenizer("query", "document").get("token_type_ids") or []
    if "token_type_ids" not in names and reranker_needs_token_types(config, pair_types):
        raise missing_token_types(str(model_dir), names)


def _load_model(model_dir: Path, task: Task) -> Any:
    import torch

    from lmserve_backend_hf.loader import _model_class, refuse_untrained_heads

    try:
        model, loading_info = _model_class(task).from_pretrained(
            str(model_dir), dtype=torch.float32, output_loading_info=True
        )
    except Exception as exc:
        raise ConfigurationError(
            f"cannot load the model from {str(model_dir)!r} as {task.value}: {exc}",
            param="model_dir",
        ) from exc
    refuse_untrained_heads(loading_info, str(model_dir), task)
    return model.eval()


def _check_forward_accepts(model: Any, names: Sequence[str]) -> None:
    import inspect

    # Only explicit parameters count: a **kwargs catch-all would take a name the model
    # then ignores or chokes on inside the trace.
    known = set(inspect.signature(model.forward).parameters)
    refused = [n for n in names if n not in known]
    if refused:
        raise ConfigurationError(
            f"--tensor_input_names: {type(model).__name__} takes no {', '.join(refused)}",
            param="tensor_input_names",
        )


def _parameter_count(model: Any) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def _max_length(tokenizer: Any, model: Any) -> int | None:
    limits = []
    declared = config_max_length(model.config.to_dict())
    if declared:
        limits.append(declared)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # "no limit" is a huge int
        limits.append(tok_max)
    return min(limits) if limits else None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bar: the steps say what is happening."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- the graph -------------------------------------------------------------------------------


def _make_wrapper(model: Any, names: Sequence[str], output_name: str) -> torch.nn.Module:
    import torch

    class _Wrapper(torch.nn.Module):
        """Takes exactly the named tensors, in order, and returns the one output."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.names = tuple(names)

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            out = self.model(**dict(zip(self.names, tensors, strict=True)), return_dict=True)
            result: torch.Tensor = out[output_name]
            return result

    return _Wrapper().eval()


def _tokenize(
    tokenizer: Any,
    texts: Sequence[str | tuple[str, str]],
    names: Sequence[str],
    max_length: int | None,
) -> dict[str, np.ndarray]:
    """Texts, or (query, document) pairs (a reranker's), padded into one batch."""
    import numpy as np

    mask = tokenizer.mask_token or "it"
    pairs = [t for t in texts if isinstance(t, tuple)]
    firsts = [t.replace("{mask}", mask) for t in texts if isinstance(t, str)]
    encoded = tokenizer(
        [q for q, _ in pairs] if pairs else firsts,
        [d for _, d in pairs] if pairs else None,
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="np",
        return_token_type_ids="token_type_ids" in names,
    )
    return {n: np.asarray(encoded[n], dtype=np.int64) for n in names}


def _run_torch(wrapper: torch.nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = wrapper(*(torch.from_numpy(a) for a in batch.values()))
    result: np.ndarray = out.float().numpy()
    return result


def _config_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape without the batch axis; every axis but the last one is the sequence."""
    if len(shape) < 2:
        raise BackendError(f"unexpected model output shape {list(shape)}")
    return tuple(-1 if axis < len(shape) - 1 else shape[axis] for axis in range(1, len(shape)))


def _export(
    wrapper: torch.nn.Module,
    sample: dict[str, np.ndarray],
    names: Sequence[str],
    output_name: str,
    path: Path,
    opset: int | None,
    steps: _Steps,
) -> tuple[str, int]:
    """The torch.export-based exporter first; the TorchScript one when it cannot."""
    if opset is None or opset >= _DYNAMO_MIN_OPSET:
        try:
            _export_dynamo(wrapper, sample, names, output_name, path, opset)
            return "dynamo", _verify_graph(path, names, output_name, opset)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            steps.say(f"torch.export-based exporter failed ({reason[:300]}); "
                      "retrying with the TorchScript exporter")  # fmt: skip
            logger.debug("dynamo export failed", exc_info=True)
            for leftover in path.parent.iterdir():
                leftover.unlink()
    _export_torchscript(wrapper, sample, names, output_name, path, opset)
    return "torchscript", _verify_graph(path, names, output_name, opset)


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters warn about things that do not apply here (torchvision ops, tracer
    constant folding of shape checks, their own deprecation); the parity check is what
    tells whether the graph is right."""
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.utils.flop_counter")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def _export_dynamo(
    wrapper: torch.nn.Module,
    sample: dict[str, np.ndarray],
    names: Sequence[str],
    output_name: str,
    path: Path,
    opset: int | None,
) -> None:
    import torch

    args = tuple(torch.from_numpy(a) for a in sample.values())
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # forward(*tensors): one varargs parameter, so one tuple of per-tensor specs.
    dynamic_shapes = (tuple({0: batch, 1: sequence} for _ in names),)
    big = sum(int(p.numel()) * p.element_size() for p in wrapper.parameters())
    with _quiet_exporters():
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=list(names),
            output_names=[output_name],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=big > _EXTERNAL_DATA_BYTES,
            verbose=False,
        )


def _export_torchscript(
    wrapper: torch.nn.Module,
    sample: dict[str, np.ndarray],
    names: Sequence[str],
    output_name: str,
    path: Path,
    opset: int | None,
) -> None:
    import torch

    args = tuple(torch.from_numpy(a) for a in sample.values())
    rank = len(_run_torch(wrapper, sample).shape)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output_name] = {0: "batch", **{i: "sequence" for i in range(1, rank - 1)}}
    with _quiet_exporters():
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=list(names),
            output_names=[output_name],
            dynamic_axes=axes,
            opset_version=opset or 17,
            dynamo=False,
        )


def _verify_graph(path: Path, names: Sequence[str], output_name: str, opset: int | None) -> int:
    """The written graph has the interface config.pbtxt will promise; returns its opset."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != list(names) or outputs != [output_name]:
        raise BackendError(
            f"the exported graph has inputs {inputs} and outputs {outputs}, "
            f"expected {list(names)} and [{output_name!r}]"
        )
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        # Batch and sequence for inputs; every axis but the last (the classes or hidden
        # size) for the output.
        variable = range(2) if value.name in names else range(len(dims) - 1)
        fixed = [i for i in variable if dims[i].HasField("dim_value")]
        if fixed:
            raise BackendError(
                f"the exporter fixed axes {fixed} of {value.name!r} "
                f"({[d.dim_param or d.dim_value for d in dims]}); they must be dynamic"
            )
    written = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset is not None and written != opset:
        raise BackendError(f"asked for opset {opset}, the exporter wrote opset {written}")
    return written


def _parity(
    wrapper: torch.nn.Module, onnx_path: Path, batches: list[dict[str, np.ndarray]]
) -> float:
    import numpy as np

    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no initializer-removal chatter
    session = ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    diffs = []
    for batch in batches:
        (got,) = session.run(None, batch)
        want = _run_torch(wrapper, batch)
        if got.shape != want.shape:
            raise ExportParityError(
                f"ONNX Runtime returned shape {list(got.shape)}, PyTorch {list(want.shape)}"
            )
        got, want = got.astype(np.float64), want.astype(np.float64)
        if got.ndim >= 3 and "attention_mask" in batch:
            # Per-token outputs: only real tokens count. Padding positions carry values
            # nobody reads (every task drops or masks them) that drift ten times more.
            real = batch["attention_mask"].astype(bool)
            got, want = got[real], want[real]
        diffs.append(float(np.max(np.abs(got - want))))
    return float(np.max(diffs))  # NaN when any is NaN


def _install(staging: Path, model_dir: Path) -> tuple[Path, Path]:
    """Move the checked files into ``model_dir``; other versions there are left alone."""
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        if item.name != "config.pbtxt":
            os.replace(item, version_dir / item.name)
    os.replace(staging / "config.pbtxt", model_dir / "config.pbtxt")
    return version_dir / "model.onnx", model_dir / "config.pbtxt"


# -- progress --------------------------------------------------------------------------------


class _Note:
    result: str | None = None


class _Steps:
    """One line when a step starts and one with its outcome and time when it ends."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.say = progress

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[_Note]:
        note = _Note()
        self.say(f"{what} ...")
        started = time.perf_counter()
        yield note
        elapsed = time.perf_counter() - started
        self.say(f"{what}: {note.result or 'done'} ({elapsed:.1f} s)")
