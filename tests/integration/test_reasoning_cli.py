"""`zili chat` and `zili extract` with a reasoning model: a random-weight model speaking
DeepSeek-R1-Distill-Qwen's tokenizer and template (tests/reasoning_model.py), whose thinking the
engine's budget ends (it writes the closing tag) so the answer follows."""

from __future__ import annotations

import json

import jsonschema
import pytest
from typer.testing import CliRunner

from tests.reasoning_model import write_r1_dummy
from zili.cli import app

ENGINE = ["--load-format", "dummy", "--dtype", "float32", "--attention-backend", "sdpa", "--no-tune-cache",
          "--kv-cache-memory", "32MiB"]
DIM = "\x1b[2m"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_r1_dummy(tmp_path_factory.mktemp("r1") / "model"))


def test_chat_shows_the_thinking_dimmed_then_the_answer(model):
    result = CliRunner().invoke(app, ["chat", "-m", model, *ENGINE, "-n", "10", "-t", "0",
                                      "--max-reasoning-tokens", "5"], input="What is 2 + 2?\n/exit\n")
    assert result.exit_code == 0, result.output
    thought_at, answer_at = result.output.index(DIM), result.output.index("\n\n")
    assert thought_at < answer_at  # dimmed thinking, then the answer after the closing tag
    assert "</think>" not in result.output


def test_chat_can_fold_the_thinking(model):
    result = CliRunner().invoke(app, ["chat", "-m", model, *ENGINE, "-n", "10", "-t", "0", "--hide-thinking",
                                      "--max-reasoning-tokens", "5"], input="What is 2 + 2?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("(thinking...)") == 1 and result.output.count("(thought for ") == 1
    assert "(thought for -" not in result.output and DIM + "\n" not in result.output


def test_extract_fills_the_form_after_thinking(model, tmp_path):
    schema = {"type": "object", "additionalProperties": False, "required": ["total"],
              "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 999}}}
    (tmp_path / "form.json").write_text(json.dumps(schema))
    (tmp_path / "doc.txt").write_text("Invoice total: 42 EUR.")
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "doc.txt"), "-s", str(tmp_path / "form.json"),
                                      "-m", model, *ENGINE, "--max-reasoning-tokens", "6", "-n", "40", "--compact"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.output), schema)


@pytest.mark.parametrize("args,message", [(["--reasoning-parser", "r1"], "deepseek-r1"),
                                          (["--reasoning-budgets", "low=lots"], "low=N")])
def test_serve_refuses_bad_reasoning_options_before_loading(model, args, message):
    result = CliRunner().invoke(app, ["serve", model, "--load-format", "dummy", *args])
    assert result.exit_code == 2 and message in result.output, result.output
