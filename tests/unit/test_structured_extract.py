"""`zili extract` (the typer command in zili.extract) on a tiny random model: whatever the model,
what it prints validates against the form; bad inputs fail with a clear message and exit code 2."""

from __future__ import annotations

import json

import jsonschema  # noqa: E402
import pytest
import typer
import xgrammar  # noqa: E402,F401
from typer.testing import CliRunner

from zili.extract import extract, extraction_messages  # noqa: E402

FORM = {"type": "object", "properties": {
    "total": {"type": "integer", "minimum": 0, "maximum": 999},
    "currency": {"enum": ["USD", "EUR"]},
    "paid": {"type": "boolean"}}, "required": ["total", "currency", "paid"]}


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    app.command()(extract)

    @app.callback()
    def main() -> None:  # keeps `extract` a named sub-command, as in the zili CLI
        pass

    return app


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.tiny_models import write_tiny_llama

    root = tmp_path_factory.mktemp("extract")
    model = write_tiny_llama(root / "model", max_position_embeddings=2048)
    (root / "form.json").write_text(json.dumps(FORM))
    (root / "doc.txt").write_text("Invoice 7. Total: 120 USD. Status: paid.")
    (root / "bad.json").write_text(json.dumps({"type": "object", "properties": {"x": {"type": "integr"}}}))
    return root, model


def run(app, *args):
    return CliRunner().invoke(app, ["extract", *map(str, args)])


def test_prints_json_valid_against_the_form(app, files):
    root, model = files
    for seed in (0, 1):
        result = run(app, "--schema", root / "form.json", root / "doc.txt", "--model", model, "--max-tokens", 200,
                     "--temperature", 1.0, "--seed", seed, "--compact")
        assert result.exit_code == 0, result.output
        jsonschema.validate(json.loads(result.stdout), FORM)


@pytest.mark.parametrize("args, message", [
    (["--schema", "{root}/bad.json", "{root}/doc.txt"], "is invalid"),
    (["--schema", "{root}/missing.json", "{root}/doc.txt"], "cannot read the schema"),
    (["--schema", "{root}/form.json", "{root}/missing.txt"], "cannot read the document"),
    (["--schema", "{root}/doc.txt", "{root}/doc.txt"], "not valid JSON"),
])
def test_bad_inputs_fail_before_loading_a_model(app, files, args, message):
    root, _ = files
    result = run(app, *[a.format(root=root) for a in args], "--model", "/nonexistent/model")
    assert result.exit_code == 2 and message in result.output, result.output


def test_running_out_of_tokens_is_an_error(app, files):
    root, model = files
    result = run(app, "--schema", root / "form.json", root / "doc.txt", "--model", model, "--max-tokens", 3)
    assert result.exit_code == 2 and "not finished" in result.output


def test_prompt_carries_schema_and_document():
    messages = extraction_messages(FORM, "  The document.  ", "Dates as YYYY-MM-DD.")
    assert messages[0]["role"] == "system" and messages[0]["content"].endswith("Dates as YYYY-MM-DD.")
    assert json.dumps(FORM) in messages[1]["content"] and "Document:\nThe document.\n" in messages[1]["content"]
