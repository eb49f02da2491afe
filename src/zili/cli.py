"""The `zili` command: generate, chat, models, serve, bench, keys, usage."""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Any, Optional

import typer

from zili.cli_options import engine_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="zili (自立): self-hosted LLM inference. Runs open-weight models on the machine you have.")

ModelOpt = typer.Option(None, "--model", "-m", help="Path to a .gguf file, an HF checkpoint directory, or an alias "
                        "(see `zili models`). Default: smollm2-135m.")
# One-shot and interactive commands start eagerly: compiling the decode step takes seconds (a minute
# or two the first time) and pays off over long outputs and many requests, as in `zili serve`.
ONE_SHOT_ENGINE_OPTIONS = ("dtype", "max_model_len", "kv_cache_memory", "kv_cache_dtype", "quantization", "threads",
                           "attention_backend", "use_tune_cache", "calibrate", "enforce_eager", "load_format",
                           "reasoning_parser", "speculative_config", "speculative_model",
                           "enable_jump_forward", "deterministic", "structured_outputs_backend")
ONE_SHOT_DEFAULTS = {"enforce_eager": True}


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _make_llm(model: Optional[str], engine_args: dict[str, Any]):
    from zili.engine.llm import LLM

    try:
        return LLM(model, **engine_args)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def _params(max_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float, seed: Optional[int],
            repetition_penalty: float, stop: Optional[list[str]]):
    from zili.sampling import SamplingParams

    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              seed=seed, repetition_penalty=repetition_penalty, stop=stop or None)
    except ValueError as e:
        _fail(str(e))


@app.command()
@engine_options(*ONE_SHOT_ENGINE_OPTIONS, defaults=ONE_SHOT_DEFAULTS)
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: Optional[str] = ModelOpt,
    chat: bool = typer.Option(False, "--chat/--raw", help="Wrap the prompt as a user message in the chat template."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 means greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(-1, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    engine_args: dict[str, Any] | None = None,
) -> None:
    """Complete one prompt and stream the answer to stdout."""
    params = _params(max_tokens, temperature, top_p, top_k, min_p, seed, repetition_penalty, stop)
    llm = _make_llm(model, engine_args or {})
    tokens = llm.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    try:
        _stream_to_stdout(llm, tokens, params)
    except ValueError as e:
        _fail(str(e))


@app.command()
@engine_options(*ONE_SHOT_ENGINE_OPTIONS, defaults=ONE_SHOT_DEFAULTS)
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start the conversation."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.7, "--temperature", "-t"),
    top_p: float = typer.Option(0.9, "--top-p"),
    top_k: int = typer.Option(-1, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    show_thinking: bool = typer.Option(True, "--show-thinking/--hide-thinking", help="A reasoning model's "
                                       "thinking: shown dimmed before the answer, or folded into one line."),
    max_reasoning_tokens: Optional[int] = typer.Option(None, "--max-reasoning-tokens", min=1,
                                                       help="A reasoning model's thinking budget per answer."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Answer until --max-tokens, past the model's "
                                    "end token (vLLM's ignore_eos, llama.cpp's --ignore-eos)."),
    engine_args: dict[str, Any] | None = None,
) -> None:
    """Talk with a model. /reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer."""
    # Ctrl-C must reach us as KeyboardInterrupt even when the parent ignored SIGINT (a job started with
    # `&` from a non-interactive shell inherits SIG_IGN, and Python then leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    params = _params(max_tokens, temperature, top_p, top_k, min_p, seed, repetition_penalty, None)
    if max_reasoning_tokens is not None:
        params = dataclasses.replace(params, max_reasoning_tokens=max_reasoning_tokens)
    if ignore_eos:
        params = dataclasses.replace(params, ignore_eos=True)
    llm = _make_llm(model, engine_args or {})
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    typer.secho("zili chat — /reset clears the conversation, /exit quits, Ctrl-C stops an answer.", err=True, dim=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            typer.echo("", err=True)
            return
        except KeyboardInterrupt:
            typer.echo("", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            history = list(start)
            typer.secho("(conversation cleared)", err=True, dim=True)
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = _stream_to_stdout(llm, llm.render_chat(history), params, show_thinking)
        except KeyboardInterrupt:
            typer.secho("\n(stopped)", err=True, dim=True)
            history.pop()
            continue
        except ValueError as e:  # e.g. the conversation outgrew the context
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def _stream_to_stdout(llm, prompt, params, show_thinking: bool = True) -> str:
    """Stream the answer; a reasoning model's thinking first, dimmed (or one "thinking..." line).
    Returns the answer (without the thinking, which is not fed back into the conversation)."""
    thinking = _ThinkingView(llm, prompt, show_thinking)
    printed = 0
    text = ""
    stream = llm.stream(prompt, params)
    try:
        for out in stream:
            text = out.outputs[0].text
            thinking.write(text[printed:], out.outputs[0].finish_reason is not None)
            printed = len(text)
    finally:
        stream.close()  # on Ctrl-C this aborts the request and frees its KV blocks
    sys.stdout.write("\n")
    sys.stdout.flush()
    return thinking.answer if thinking.parser is not None else text


class _ThinkingView:
    """Writes generated text to the terminal, a reasoning model's thinking dimmed (zili.reasoning)."""

    def __init__(self, llm, prompt, show: bool) -> None:
        from zili.reasoning import NONE, ReasoningParser

        style = getattr(llm.engine, "reasoning_style", NONE)
        tail = llm.tokenizer.decode(prompt[-8:], skip_special_tokens=False) if isinstance(prompt, list) else prompt
        self.parser = ReasoningParser(style, tail) if style != NONE else None
        self.show, self.answer, self.thought = show, "", 0

    def write(self, piece: str, last: bool) -> None:
        if self.parser is None:
            sys.stdout.write(piece)
        else:
            parts = [self.parser.feed(piece)] + ([self.parser.finish()] if last else [])
            for part in parts:
                self._thinking(part.reasoning)
                if part.content:
                    if self.thought > 0 and not self.show:
                        sys.stdout.write(f"\r{typer.style(f'(thought for {self.thought} characters)', dim=True)}\n")
                        self.thought = -1
                    sys.stdout.write(part.content)
                    self.answer += part.content
        sys.stdout.flush()

    def _thinking(self, text: str) -> None:
        if not text:
            return
        if self.show:
            sys.stdout.write(typer.style(text, dim=True))
        elif self.thought >= 0:
            if self.thought == 0:
                sys.stdout.write(typer.style("(thinking...)", dim=True))
            self.thought += len(text)


@app.command()
def models() -> None:
    """List model aliases and what they resolve to."""
    from zili.weights.resolve import list_aliases

    for alias, (description, where) in list_aliases().items():
        typer.echo(f"{alias:16} {description}\n{'':16} {where}")


def _register_subcommands() -> None:
    from zili.bench.cli import bench_app
    from zili.governance.cli import keys_app, usage
    from zili.server.launcher import serve
    from zili.tune import tune

    app.command("serve", help="Start the OpenAI-compatible HTTP server.")(serve)
    app.add_typer(bench_app, name="bench", help="Benchmarks: offline, serving, and side by side with peers.")
    app.command("tune", help="Measure kernels and settings on this device; save the winners.")(tune)
    app.add_typer(keys_app, name="keys", help="API keys with quotas, kept in zili's database.")
    app.command("usage", help="Requests, tokens and cost per day, model or key, from the usage ledger.")(usage)
    try:
        from zili.extract import extract
    except ImportError:  # structured output needs xgrammar
        return
    app.command("extract", help="Fill a JSON schema from a document; the output always validates.")(extract)


_register_subcommands()

if __name__ == "__main__":
    app()
