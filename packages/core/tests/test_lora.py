"""LoRA bookkeeping in core: --lora-modules in vLLM's two forms, the checks on an adapter folder,
the registry's leases that an unload waits for, and the startup checks of the flags."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lmserve_core.errors import ConfigurationError, Conflict, InvalidInput, ModelNotFound
from lmserve_core.lora import (
    AdapterRegistry,
    LoRAAdapter,
    LoRAModule,
    local_adapter_dir,
    parse_lora_modules,
    read_adapter_config,
    target_modules,
)
from lmserve_core.plan import check_lora_flags
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task


def test_lora_modules_in_both_of_vllms_forms() -> None:
    modules = parse_lora_modules([
        "sql=/adapters/sql",
        '{"name": "chat", "path": "org/chat-lora", "base_model_name": "llama"}',
        "eq=/a=b",  # only the first '=' splits
    ])  # fmt: skip
    assert modules == [
        LoRAModule("sql", "/adapters/sql"),
        LoRAModule("chat", "org/chat-lora", "llama"),
        LoRAModule("eq", "/a=b"),
    ]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("just-a-path", "neither name=path"),
        ("=/x", "neither name=path"),
        ('{"name": "x"', "not valid JSON"),
        ('{"name": "x", "path": "/p", "rank": 8}', "the JSON form takes"),
        ('{"name": "", "path": "/p"}', "non-empty 'name' and 'path'"),
        ('{"name": "x", "path": "/p", "base_model_name": 3}', "must be a string"),
    ],
)
def test_bad_lora_modules_name_the_flag(value: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        parse_lora_modules([value])
    assert info.value.param == "lora_modules"


def test_the_same_adapter_name_twice_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'a' twice"):
        parse_lora_modules(["a=/x", '{"name": "a", "path": "/y"}'])


def _adapter_dir(root: Path, **config: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    body = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]} | config
    (root / "adapter_config.json").write_text(json.dumps(body))
    (root / "adapter_model.safetensors").write_bytes(b"weights")
    return root


def test_a_good_adapter_folder_reads(tmp_path: Path) -> None:
    config = read_adapter_config(_adapter_dir(tmp_path / "a"), max_rank=16)
    assert config["r"] == 8
    assert target_modules(config) == ("q_proj", "v_proj")
    assert target_modules({"target_modules": "all-linear"}) == ("all-linear",)


def test_bad_adapter_folders_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no LoRA adapter folder"):
        read_adapter_config(tmp_path / "missing", max_rank=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match=r"no adapter_config\.json"):
        read_adapter_config(empty, max_rank=16)
    garbage = _adapter_dir(tmp_path / "garbage")
    (garbage / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="cannot read"):
        read_adapter_config(garbage, max_rank=16)
    with pytest.raises(InvalidInput, match="PREFIX_TUNING adapter; only LoRA"):
        read_adapter_config(_adapter_dir(tmp_path / "p", peft_type="PREFIX_TUNING"), max_rank=16)
    with pytest.raises(InvalidInput, match="rank 64, above --max-lora-rank 16"):
        read_adapter_config(_adapter_dir(tmp_path / "big", r=64), max_rank=16)
    with pytest.raises(InvalidInput, match="'r' must be a positive integer"):
        read_adapter_config(_adapter_dir(tmp_path / "zero", r=0), max_rank=16)
    weightless = _adapter_dir(tmp_path / "w")
    (weightless / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="no adapter weights"):
        read_adapter_config(weightless, max_rank=16)


def test_local_folders_and_hub_ids_are_told_apart(tmp_path: Path) -> None:
    assert local_adapter_dir(str(tmp_path)) == tmp_path
    assert local_adapter_dir("/does/not/exist") == Path("/does/not/exist")  # absolute: local
    assert local_adapter_dir("./rel") == Path("./rel")
    assert local_adapter_dir("org/some-lora") is None  # a hub id


def _adapter(name: str, int_id: int = 1) -> LoRAAdapter:
    return LoRAAdapter(name=name, int_id=int_id, path="/p", source="/p", rank=8)


def test_registry_refuses_base_names_and_holds_at_most_max_adapters() -> None:
    registry = AdapterRegistry(["model", "alias"], max_adapters=1)
    with pytest.raises(InvalidInput, match="conflicts with a served base model"):
        registry.add(_adapter("alias"))
    registry.add(_adapter("a"))
    with pytest.raises(InvalidInput, match="--max-cpu-loras 1"):
        registry.add(_adapter("b", 2))
    registry.add(_adapter("a", 3))  # the same name again replaces (in place)
    assert registry.get("a") == _adapter("a", 3)
    assert registry.names == ["a"]


def test_unload_waits_for_the_adapters_requests() -> None:
    asyncio.run(_unload_waits())


async def _unload_waits() -> None:
    registry = AdapterRegistry(["model"])
    registry.add(_adapter("a"))
    lease = registry.lease("a")
    drain = asyncio.ensure_future(registry.drain("a", timeout=10))
    await asyncio.sleep(0.05)
    assert not drain.done()  # a request still holds it
    assert registry.get("a") is None  # ...but nobody new gets it
    with pytest.raises(ModelNotFound):
        registry.lease("a")
    assert registry.loaded("a")  # a second load of the name is still refused meanwhile
    lease.release()
    lease.release()  # idempotent
    assert (await drain).name == "a"


def test_an_unload_that_runs_out_of_time_leaves_the_adapter_serving() -> None:
    asyncio.run(_unload_times_out())


async def _unload_times_out() -> None:
    registry = AdapterRegistry(["model"])
    registry.add(_adapter("a"))
    lease = registry.lease("a")
    with pytest.raises(Conflict, match="1 request\\(s\\) in flight"):
        await registry.drain("a", timeout=0.05)
    assert registry.get("a") is not None
    lease.release()
    await registry.drain("a", timeout=1)
    with pytest.raises(ModelNotFound, match="cannot be found"):
        await registry.drain("a", timeout=1)


def test_a_load_in_place_serves_the_new_weights_while_the_old_finish() -> None:
    asyncio.run(_in_place())


async def _in_place() -> None:
    registry = AdapterRegistry(["model"])
    registry.add(_adapter("a", 1))
    lease = registry.lease("a")
    old = registry.replace(_adapter("a", 2))
    assert old is not None and old.adapter.int_id == 1
    assert registry.get("a") == _adapter("a", 2)  # new requests: the new weights
    released = asyncio.ensure_future(old.released())
    await asyncio.sleep(0.02)
    assert not released.done()  # a request still runs on the old weights
    lease.release()
    await asyncio.wait_for(released, 1)
    assert registry.replace(_adapter("b", 3)) is None


def _settings(**values: object) -> ServeSettings:
    return ServeSettings.model_validate({"model_dir": "/m", **values})


def test_startup_checks_of_the_lora_flags() -> None:
    check_lora_flags(
        _settings(enable_lora=True, lora_modules=["a=/x"]), "vllm", Task.text_generation
    )
    with pytest.raises(ConfigurationError, match="needs --enable-lora"):
        check_lora_flags(_settings(lora_modules=["a=/x"]), "huggingface", Task.text_generation)
    with pytest.raises(ConfigurationError, match="the onnx backend does not serve"):
        check_lora_flags(_settings(enable_lora=True), "onnx", Task.text_generation)
    with pytest.raises(ConfigurationError, match="below --max-loras 4"):
        check_lora_flags(
            _settings(enable_lora=True, max_loras=4, max_cpu_loras=2), "vllm", Task.text_generation
        )
    with pytest.raises(ConfigurationError, match="neither name=path"):
        check_lora_flags(
            _settings(enable_lora=True, lora_modules=["x"]), "vllm", Task.text_generation
        )


def test_runtime_updates_follow_the_flag_or_vllms_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    assert not _settings(enable_lora=True).lora_runtime_updates
    assert _settings(enable_lora=True, enable_lora_runtime_updates=True).lora_runtime_updates
    assert not _settings(enable_lora_runtime_updates=True).lora_runtime_updates  # needs LoRA
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert _settings(enable_lora=True).lora_runtime_updates
