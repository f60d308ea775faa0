"""The CLI is generated from ServeSettings: both spellings, env twins, strict errors."""

from __future__ import annotations

import pytest

from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_server.cli import build_settings, serve_parser


def parse(*argv: str, env: dict[str, str] | None = None) -> ServeSettings:
    parser = serve_parser()
    return build_settings(parser, parser.parse_args(list(argv)), environ=env or {})


def test_every_field_has_both_spellings() -> None:
    parser = serve_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name, field in ServeSettings.model_fields.items():
        if (
            isinstance(field.json_schema_extra, dict)
            and field.json_schema_extra.get("cli") is False
        ):
            assert f"--{name}" not in flags
            continue
        assert f"--{name}" in flags and f"--{name.replace('_', '-')}" in flags
    assert "--max_model_len" in flags and "--max-model-len" in flags


def test_spellings_mean_the_same() -> None:
    a = parse("--model_name", "m", "--max_length", "12", "--return_probabilities")
    b = parse("--model-name", "m", "--max-model-len", "12", "--return-probabilities")
    assert a == b
    assert a.model_name == "m" and a.max_length == 12 and a.return_probabilities


def test_task_accepts_pipeline_names() -> None:
    assert parse("--task", "text-classification").task is Task.sequence_classification
    assert parse("--task", "fill_mask").task is Task.fill_mask


def test_env_twins_and_cli_wins() -> None:
    env = {
        "LMSERVE_MODEL_NAME": "from-env",
        "LMSERVE_DISABLE_LOWER_CASE": "1",
        "LMSERVE_HTTP_PORT": "9000",
    }
    s = parse(env=env)
    assert (s.model_name, s.disable_lower_case, s.http_port) == ("from-env", True, 9000)
    assert parse("--model_name", "cli", env=env).model_name == "cli"


@pytest.mark.parametrize(
    "argv",
    [["--unknown"], ["--task", "summarize"], ["--dtype", "int4"], ["--http_port", "x"],
     ["--max_length", "0"], ["--backend", "tf"], ["--model_nam", "abbrev"]],
)  # fmt: skip
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_bad_env_boolean_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        parse(env={"LMSERVE_TRUST_REMOTE_CODE": "maybe"})
    assert exc.value.code == 2


@pytest.mark.parametrize("which", ["serve", "serve-ray", "export"])
def test_every_flag_of_every_subcommand_names_its_env_twin(which: str) -> None:
    from lmserve_server.cli import export_parser, serve_ray_parser

    parser = {"serve": serve_parser, "serve-ray": serve_ray_parser, "export": export_parser}[
        which
    ]()
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "help_engine"):
            continue
        env = f"LMSERVE_{action.dest.upper()}"
        assert action.help and f"[env {env}" in action.help, (which, action.dest)


def test_export_shows_its_defaults() -> None:
    from lmserve_server.cli import export_parser

    helps = {a.dest: a.help or "" for a in export_parser()._actions}
    assert "default model]" in helps["model_name"] and "default 32]" in helps["max_batch_size"]


def test_export_flags_read_their_env_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmserve_server.cli import export_settings

    monkeypatch.setenv("LMSERVE_OUTPUT", "/tmp/repo")
    monkeypatch.setenv("LMSERVE_TENSOR_INPUT_NAMES", "input_ids,attention_mask")
    monkeypatch.setenv("LMSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("LMSERVE_MODEL_NAME", "from-env")
    ns = export_settings(["--model_name", "m"])  # the command line wins over the environment
    assert (ns.output, ns.tensor_input_names, ns.max_batch_size, ns.model_name) == (
        "/tmp/repo", "input_ids,attention_mask", 8, "m",
    )  # fmt: skip


def test_export_rejects_a_bad_value_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lmserve_server.cli import export_settings

    with pytest.raises(SystemExit) as exc:
        export_settings(["--output", "r", "--tensor_input_names", "a", "--max_batch_size", "0"])
    assert exc.value.code == 2 and "--max_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        ([], {}, ["model"]),
        (["--served-model-name", "a", "b"], {}, ["a", "b"]),
        (["--served_model_name", "a"], {}, ["a"]),
        (["--model_name", "kserve", "--served-model-name", "a", "kserve"], {}, ["kserve", "a"]),
        ([], {"LMSERVE_SERVED_MODEL_NAME": "x, y"}, ["x", "y"]),
        (["--served-model-name", "z"], {"LMSERVE_SERVED_MODEL_NAME": "x y"}, ["z"]),
    ],
)
def test_served_model_names(argv: list[str], env: dict[str, str], names: list[str]) -> None:
    parser = serve_parser()
    namespace, leftovers = parser.parse_known_args(argv)
    assert leftovers == []  # lmserve's flag, not passed on to vLLM
    assert build_settings(parser, namespace, environ=env).served_names == names


def test_served_model_name_needs_a_name() -> None:
    with pytest.raises(SystemExit) as exc:
        serve_parser().parse_args(["--served-model-name"])
    assert exc.value.code == 2
