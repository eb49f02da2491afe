"""One declaration of the engine's command-line options (zili.cli_options): every command that
builds an engine takes them from ENGINE_OPTIONS, so a flag means the same everywhere."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
from typer.testing import CliRunner

from zili.cli import ONE_SHOT_ENGINE_OPTIONS, app
from zili.cli_options import ENGINE_OPTIONS, engine_options
from zili.config import EngineConfig
from zili.server.launcher import SERVE_ENGINE_OPTIONS

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _command(name: str):
    return typer.main.get_command(app).commands[name]  # the click command typer builds


def _engine_params(name: str) -> dict:
    """The command's click parameters that set an EngineConfig field, by field."""
    return {p.name: p for p in _command(name).params if p.name in ENGINE_OPTIONS}


def _help(name: str) -> str:
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def test_every_engine_option_is_an_engine_config_field():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(ENGINE_OPTIONS) <= fields


@pytest.mark.parametrize("command,names", [("serve", SERVE_ENGINE_OPTIONS), ("generate", ONE_SHOT_ENGINE_OPTIONS),
                                           ("chat", ONE_SHOT_ENGINE_OPTIONS), ("tune", None)])
def test_commands_take_their_engine_options_from_the_one_declaration(command, names):
    params = _engine_params(command)
    if names is not None:
        assert set(params) == set(names)
    for name, param in params.items():
        option = ENGINE_OPTIONS[name]
        assert param.help == option.help, name
        flags = option.flags or (f"--{name.replace('_', '-')}",)
        declared = {f for spec in flags for f in spec.split("/")}
        assert set(param.opts) | set(param.secondary_opts) == declared, name


def test_serve_and_generate_help_list_the_same_engine_options():
    shared = [n for n in ENGINE_OPTIONS if n in SERVE_ENGINE_OPTIONS and n in ONE_SHOT_ENGINE_OPTIONS]
    assert len(shared) >= 8  # dtype, context, KV memory, quantization, threads, backend, eager, format...
    serve_help, generate_help = _help("serve"), _help("generate")
    for name in shared:
        option = ENGINE_OPTIONS[name]
        for spec in option.flags or (f"--{name.replace('_', '-')}",):
            for flag in spec.split("/"):
                assert flag in serve_help and flag in generate_help, flag
        # the help text's first words, as rich may wrap the rest
        head = " ".join(option.help.split()[:4])
        assert head in serve_help and head in generate_help, name
    # serve runs many requests: it takes the batch size and tensor parallelism too
    assert "--max-num-seqs" in serve_help and "--tensor-parallel-size" in serve_help


def test_serve_keeps_its_engine_defaults():
    params = _engine_params("serve")
    expected = {"dtype": "auto", "quantization": "auto", "attention_backend": "auto", "load_format": "auto",
                "reasoning_parser": "auto", "use_tune_cache": True, "calibrate": None, "enforce_eager": None,
                "tensor_parallel_size": 1,
                "max_model_len": None, "max_num_seqs": None, "max_num_batched_tokens": None, "kv_cache_memory": None,
                "threads": None,
                "speculative_config": None, "speculative_model": None, "kv_cache_dtype": "auto",
                "enable_jump_forward": None, "jump_forward_mode": None, "deterministic": None,
                "structured_outputs_backend": "auto"}
    assert {name: p.default for name, p in params.items()} == expected
    # one-shot commands start eagerly (a per-command override of the same declaration)
    assert _engine_params("generate")["enforce_eager"].default is True


def test_only_given_options_reach_the_command():
    seen = []

    @engine_options("dtype", "max_model_len", "enforce_eager")
    def run(name: str = "x", engine_args: dict | None = None) -> None:
        seen.append(engine_args)

    cli = typer.Typer()
    cli.command()(run)
    assert CliRunner().invoke(cli, ["--max-model-len", "64", "--compile"]).exit_code == 0
    assert CliRunner().invoke(cli, []).exit_code == 0
    assert seen == [{"dtype": "auto", "max_model_len": 64, "enforce_eager": False}, {"dtype": "auto"}]


def test_an_unknown_engine_option_fails_at_declaration():
    with pytest.raises(ValueError, match="no_such_option"):
        engine_options("no_such_option")
