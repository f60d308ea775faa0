"""The forward channel of --api_workers: its wire format, and a worker's encoder against a
ForwardServer over a real ZeroMQ IPC socket (a numpy model stands in for torch)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmserve_core.backend import LoadedEncoder
from lmserve_core.encoder import EncoderOptions, ModelInfo
from lmserve_core.errors import (
    BackendError,
    InvalidInput,
    LmserveError,
    ModelNotReady,
    Overloaded,
)
from lmserve_core.model_host import ModelState
from lmserve_server.batch_merge import merge, mergeable, split
from lmserve_server.forward_channel import (
    ForwardServer,
    RemoteEncoder,
    decode_arrays,
    decode_reply,
    encode_arrays,
    encode_error,
    encode_output,
    encode_status,
)
from lmserve_server.worker_metrics import merge_pages


def _inputs(n: int = 3, length: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, 30_000, size=(n, length), dtype=np.int64),
        "attention_mask": np.ones((n, length), dtype=np.int64),
        "token_type_ids": np.zeros((n, length), dtype=np.int64),
    }


def _bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(f) for f in frames]


def test_arrays_round_trip_exactly_and_writable() -> None:
    sent = _inputs()
    sent["input_ids"] = np.asfortranarray(sent["input_ids"])  # made C-contiguous on the way
    got = decode_arrays(_bytes(encode_arrays(sent)))
    assert list(got) == list(sent)
    for name, array in sent.items():
        assert got[name].dtype == np.int64 and got[name].shape == array.shape
        np.testing.assert_array_equal(got[name], array)
        assert got[name].flags.writeable  # torch.from_numpy warns on read-only arrays


def test_header_is_json_naming_dtype_and_shape() -> None:
    frames = _bytes(encode_arrays({"input_ids": np.zeros((2, 5), dtype=np.int64)}))
    assert json.loads(frames[0]) == {
        "tensors": [{"name": "input_ids", "dtype": "int64", "shape": [2, 5]}]
    }
    assert len(frames[1]) == 2 * 5 * 8


@pytest.mark.parametrize(
    "frames, why",
    [
        ([b"not json", b""], "not JSON"),
        ([b"[1]", b""], "not a JSON object"),
        ([json.dumps({"tensors": [{"name": "a", "dtype": "int64", "shape": [2]}]}).encode()],
         "carries 0"),
        ([json.dumps({"tensors": [{"name": "a", "dtype": "int64", "shape": [2]}]}).encode(),
          b"\0" * 15], "15 bytes"),
        ([json.dumps({"tensors": [{"name": "a", "dtype": "object", "shape": [1]}]}).encode(),
          b"\0" * 8], "dtype 'object'"),
        ([json.dumps({"tensors": [{"name": "a", "dtype": "float64", "shape": [1]}]}).encode(),
          b"\0" * 8], "dtype 'float64'"),
        ([json.dumps({"tensors": [{"name": "a", "dtype": "int64", "shape": [-1]}]}).encode(),
          b""], "not a list of sizes"),
        ([json.dumps({"tensors": [{"name": "a", "dtype": "int64", "shape": [1]},
                                  {"name": "a", "dtype": "int64", "shape": [1]}]}).encode(),
          b"\0" * 8, b"\0" * 8], "repeated"),
    ],
)  # fmt: skip
def test_malformed_messages_are_backend_errors(frames: list[bytes], why: str) -> None:
    with pytest.raises(BackendError, match=why):
        decode_arrays(frames)


def test_output_round_trip() -> None:
    logits = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 7
    got = decode_reply(_bytes(encode_output(logits)))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, logits)


def test_output_of_an_integer_dtype_is_refused() -> None:
    with pytest.raises(BackendError, match="dtype 'int64'"):
        decode_reply(_bytes(encode_output(np.zeros(3, dtype=np.int64))))


@pytest.mark.parametrize(
    "raised, expected, param",
    [
        (InvalidInput("bad ids", param="input"), InvalidInput, "input"),
        (ModelNotReady("still loading"), ModelNotReady, None),
        (Overloaded("queue full"), Overloaded, None),
        (ValueError("shapes differ"), BackendError, None),
    ],
)
def test_errors_keep_their_class_message_and_param(
    raised: Exception, expected: type[LmserveError], param: str | None
) -> None:
    with pytest.raises(expected) as info:
        decode_reply(_bytes(encode_error(raised)))
    assert type(info.value) is expected
    assert info.value.param == param
    assert str(raised) in info.value.message
    if expected is BackendError:
        assert info.value.message.startswith("ValueError:")


def test_status_round_trip_and_unknown_replies() -> None:
    status = decode_reply(_bytes(encode_status("ready", details={"device": "cpu"})))
    assert isinstance(status, dict)
    assert status["state"] == "ready" and status["details"] == {"device": "cpu"}
    assert isinstance(status["pid"], int)
    with pytest.raises(BackendError, match="unknown reply"):
        decode_reply([b"XX", b"{}"])


# --- a worker's encoder against the owner's server -------------------------------------


class _SumModel:
    """Logits [N, 2]: (sum of the ids, sum of the mask); InvalidInput for an id of -1."""

    def __init__(self, delay: float = 0.0) -> None:
        self.threads: set[str] = set()
        self.rows: list[int] = []  # rows of each pass
        self.delay = delay

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.rows.append(len(inputs["input_ids"]))
        time.sleep(self.delay)
        ids = inputs["input_ids"]
        if (ids == -1).any():
            raise InvalidInput("id -1", param="input_ids")
        if (ids == -2).any():
            raise RuntimeError("the model broke")
        return np.stack([ids.sum(1), inputs["attention_mask"].sum(1)], 1).astype(np.float32)

    def check_health(self) -> None: ...

    def close(self) -> None: ...


class _PadOnly:
    pad_token_id = 0


class _Host:
    """What ForwardServer reads of a ModelHost."""

    def __init__(self, model: _SumModel) -> None:
        self.name = "m"
        self.state = ModelState.loading
        self.error: str | None = None
        self.loaded: LoadedEncoder | None = None
        self.model = model

    @property
    def ready(self) -> bool:
        return self.state is ModelState.ready

    def finish_loading(self) -> None:
        self.loaded = LoadedEncoder(
            backend=self.model, tokenizer=_PadOnly(),  # type: ignore[arg-type]
            info=ModelInfo(), options=EncoderOptions(), details={"device": "cpu"},
        )  # fmt: skip
        self.state = ModelState.ready


def test_remote_encoder_forwards_through_the_owner(tmp_path: Path) -> None:
    model = _SumModel()
    host = _Host(model)

    async def scenario() -> None:
        server = ForwardServer(host, f"ipc://{tmp_path / 'forward'}")  # type: ignore[arg-type]
        server.details = {"api_workers": 2}
        server.start()
        remote = RemoteEncoder(server.endpoint)
        try:
            # Not ready until the owner's model is: the worker waits, then learns its details.
            waiting = asyncio.ensure_future(asyncio.to_thread(remote.wait_until_loaded))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            host.finish_loading()
            status = await asyncio.wait_for(waiting, 5)
            assert status["state"] == "ready"
            assert remote.details == {"device": "cpu", "api_workers": 2}
            remote.check_health()

            inputs = _inputs(4, 6)
            out = await asyncio.to_thread(remote.forward, inputs)
            np.testing.assert_array_equal(out[:, 0], inputs["input_ids"].sum(1))
            np.testing.assert_array_equal(out[:, 1], [6, 6, 6, 6])
            assert model.threads and all(t.startswith("lmserve-forward") for t in model.threads)

            bad = {**inputs, "input_ids": np.full((1, 3), -1, dtype=np.int64)}
            with pytest.raises(InvalidInput, match="id -1") as info:
                await asyncio.to_thread(remote.forward, bad)
            assert info.value.param == "input_ids"
            broken = {**inputs, "input_ids": np.full((1, 3), -2, dtype=np.int64)}
            with pytest.raises(BackendError, match="RuntimeError: the model broke"):
                await asyncio.to_thread(remote.forward, broken)

            # Batches that arrive while the model is busy share its next pass; each worker
            # still gets exactly its own rows back.
            model.delay, model.rows = 0.2, []
            workers = [RemoteEncoder(server.endpoint) for _ in range(3)]
            sent = [_inputs(n, length) for n, length in ((2, 5), (3, 5), (1, 5))]
            first = asyncio.ensure_future(asyncio.to_thread(remote.forward, _inputs(1, 4)))
            await asyncio.sleep(0.05)  # the model is busy with it now
            outs = await asyncio.gather(
                *(asyncio.to_thread(w.forward, x) for w, x in zip(workers, sent, strict=True))
            )
            await first
            assert model.rows == [1, 6], model.rows
            for x, out in zip(sent, outs, strict=True):
                np.testing.assert_array_equal(out[:, 0], x["input_ids"].sum(1))
            for w in workers:
                await asyncio.to_thread(w.close)
            model.delay = 0.0

            # Readiness follows the owner (the prober asks every 0.5 s).
            host.state = ModelState.failed
            await asyncio.sleep(1.2)
            with pytest.raises(ModelNotReady, match="failed"):
                remote.check_health()
        finally:
            await asyncio.to_thread(remote.close)
            await server.close()
        with pytest.raises(ModelNotReady, match="shutting down"):
            remote.forward(_inputs())

    asyncio.run(scenario())


# --- /metrics of several workers -------------------------------------------------------

_PAGE = """# HELP lmserve_requests_total HTTP requests
# TYPE lmserve_requests_total counter
lmserve_requests_total{{route="/v1",status="200"}} {count}
lmserve_requests_created{{route="/v1",status="200"}} {created}
# HELP lmserve_batch_size Instances per pass
# TYPE lmserve_batch_size histogram
lmserve_batch_size_bucket{{le="1.0"}} {count}
lmserve_batch_size_bucket{{le="+Inf"}} {count}
lmserve_batch_size_count {count}
lmserve_batch_size_sum {count}
# HELP lmserve_model_ready 1 when ready
# TYPE lmserve_model_ready gauge
lmserve_model_ready{{model="m"}} {ready}
"""


def test_merged_pages_add_up_counters_and_histograms() -> None:
    a = _PAGE.format(count=3, created=200.0, ready=1).encode()
    b = _PAGE.format(count=4, created=100.0, ready=0).encode()
    text = merge_pages([a, b]).decode()
    assert 'lmserve_requests_total{route="/v1",status="200"} 7.0' in text
    assert 'lmserve_requests_created{route="/v1",status="200"} 100.0' in text
    assert 'lmserve_batch_size_bucket{le="+Inf"} 7.0' in text
    assert "lmserve_batch_size_count 7.0" in text
    # Ready only when every worker is.
    assert 'lmserve_model_ready{model="m"} 0.0' in text
    assert "# TYPE lmserve_requests_total counter" in text


# --- batches of several workers in one pass --------------------------------------------


def _rows(*lengths: int, extra: bool = False) -> dict[str, np.ndarray]:
    """Right-padded rows of the given lengths (ids 1..n), as a worker pads them."""
    longest = max(lengths)
    ids = np.zeros((len(lengths), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.arange(1, n + 1)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if extra:
        batch["token_type_ids"] = np.zeros_like(ids)
    return batch


def _per_token(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """A model whose output at each position depends on that row's real tokens only."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    totals = (ids * mask).sum(1, keepdims=True)
    return np.stack([ids * mask, np.broadcast_to(totals, ids.shape)], -1).astype(np.float32)


def test_merged_pass_gives_each_batch_what_it_would_get_alone() -> None:
    batches = [_rows(5, 3), _rows(4), _rows(5, 5, 2)]
    merged = merge(batches, pad_id=0)
    assert merged["input_ids"].shape == (6, 5)
    assert merged["attention_mask"][2].tolist() == [1, 1, 1, 1, 0]  # padding is masked
    parts = split(_per_token(merged), batches)
    for batch, part in zip(batches, parts, strict=True):
        np.testing.assert_array_equal(part, _per_token(batch))  # [rows, own length, 2]
    # Per-row outputs ([rows, classes]) are only split.
    pooled = split(_per_token(merged)[:, 0, :], batches)
    assert [p.shape for p in pooled] == [(2, 2), (1, 2), (3, 2)]


def test_padding_uses_the_pad_id_for_ids_and_zero_elsewhere() -> None:
    merged = merge([_rows(2, extra=True), _rows(4, extra=True)], pad_id=7)
    assert merged["input_ids"][0].tolist() == [1, 2, 7, 7]
    assert merged["attention_mask"][0].tolist() == [1, 1, 0, 0]
    assert merged["token_type_ids"][0].tolist() == [0, 0, 0, 0]


def test_only_batches_that_add_little_padding_merge() -> None:
    assert mergeable([_rows(20, 20)], _rows(19))
    assert not mergeable([_rows(20, 20)], _rows(4))  # 3 x 20 padded vs 44 real: too much
    assert not mergeable([_rows(8)], _rows(8, extra=True))  # other tensors
    assert not mergeable([_rows(*[8] * 40)], _rows(*[8] * 30))  # past 64 rows


def test_a_wrong_row_count_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="3 rows for 4 inputs"):
        split(np.zeros((3, 2), dtype=np.float32), [_rows(2, 2), _rows(1, 1)])
