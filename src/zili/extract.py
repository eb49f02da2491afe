"""`zili extract`: read a document, fill a JSON form (a JSON schema), print the filled JSON.

The output is decoded under the schema's grammar, so it parses and validates every time; a form
the model could not finish within --max-tokens is an error, never half a JSON.
The same prompt is built by `extraction_messages`, so the HTTP API gives the same answer (see
examples/README.md). With a reasoning model (zili.reasoning) the model thinks first, in free text
(bounded by --max-reasoning-tokens), and the grammar holds from the end of its thinking.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from zili.cli_options import engine_options
from zili.engine.llm import LLM
from zili.engine.thinking import split_output_reasoning
from zili.sampling import SamplingParams
from zili.structured.spec import StructuredOutput

SYSTEM_PROMPT = (
    "You read documents and fill in forms. Answer with one JSON object that matches the JSON schema "
    "of the form. Use only facts stated in the document; copy names, dates and numbers exactly."
)


def extraction_messages(schema: dict[str, Any], document: str, instructions: str | None = None) -> list[dict]:
    """The chat messages asking a model to fill `schema` from `document`."""
    system = SYSTEM_PROMPT + (f"\n{instructions}" if instructions else "")
    user = (f"JSON schema of the form:\n{json.dumps(schema, ensure_ascii=False)}\n\n"
            f"Document:\n{document.strip()}\n\nFill in the form as JSON.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def extraction_request(llm: Any, schema: dict[str, Any], document: str, *, max_tokens: int = 1024,
                       temperature: float = 0.0, seed: int | None = None, instructions: str | None = None,
                       max_reasoning_tokens: int | None = None) -> tuple[list[int], Any]:
    """The prompt (token ids) and SamplingParams that fill `schema` from `document` with a `zili.LLM`."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, structured={"json": schema},
                            max_reasoning_tokens=max_reasoning_tokens)
    return llm.render_chat(extraction_messages(schema, document, instructions)), params


def filled_form(output: Any, schema: dict[str, Any]) -> Any:
    """The JSON value of a finished extraction (a CompletionOutput whose text is the answer, a reasoning
    model's thinking split off); ValueError if it ran out of tokens."""
    if output.finish_reason != "stop":
        raise ValueError(f"the form was not finished within the token limit (finish reason: {output.finish_reason})"
                         f"; raise --max-tokens")
    value = json.loads(output.text)
    _validate(value, schema)
    return value


def extract_json(llm: Any, schema: dict[str, Any], document: str, **options: Any) -> Any:
    """Fill the form with an already loaded `zili.LLM` (options: max_tokens, temperature, seed, instructions,
    max_reasoning_tokens)."""
    prompt, params = extraction_request(llm, schema, document, **options)
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    return filled_form(split_output_reasoning(output, llm.engine.reasoning_style, llm.tokenizer).outputs[0], schema)


def _validate(value: Any, schema: dict[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:  # cannot happen under the grammar; say so if it does
        raise ValueError(f"the filled form does not validate against the schema: {e.message}") from None


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        _fail(f"cannot read the schema {str(path)!r}: {e.strerror or e}")
    except json.JSONDecodeError as e:
        _fail(f"the schema {str(path)!r} is not valid JSON: {e}")
    try:
        StructuredOutput.json(schema)
    except ValueError as e:
        _fail(f"{path}: {e}")
    return schema


def _read_document(document: str) -> str:
    if document == "-":
        return sys.stdin.read()
    try:
        return Path(document).read_text(encoding="utf-8")
    except OSError as e:
        _fail(f"cannot read the document {document!r}: {e.strerror or e}")
    except UnicodeDecodeError:
        _fail(f"the document {document!r} is not UTF-8 text")


@engine_options("dtype", "max_model_len", "kv_cache_memory", "quantization", "threads", "attention_backend",
                "use_tune_cache", "enforce_eager", "load_format", "reasoning_parser", defaults={"enforce_eager": True})
def extract(
    document: str = typer.Argument(..., help="The document to read: a UTF-8 text file, or - for stdin."),
    schema: Path = typer.Option(..., "--schema", "-s", help="The form: a JSON schema file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Path to a .gguf file, an HF checkpoint "
                                        "directory, or an alias (see `zili models`). Default: smollm2-135m."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", help="Most tokens the filled form may take."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 means greedy."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    instructions: Optional[str] = typer.Option(None, "--instructions", help="Extra guidance for the model."),
    compact: bool = typer.Option(False, "--compact", help="Print the JSON on one line."),
    max_reasoning_tokens: Optional[int] = typer.Option(
        None, "--max-reasoning-tokens", min=1, help="A reasoning model's thinking budget before it fills the form."),
    engine_args: dict[str, Any] | None = None,
) -> None:
    """Fill a JSON form from a document; prints JSON that is valid against the schema."""
    form = _read_schema(schema)
    text = _read_document(document)
    try:
        llm = LLM(model, **(engine_args or {}))
        value = extract_json(llm, form, text, max_tokens=max_tokens, temperature=temperature, seed=seed,
                             instructions=instructions, max_reasoning_tokens=max_reasoning_tokens)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(json.dumps(value, ensure_ascii=False, indent=None if compact else 2))
