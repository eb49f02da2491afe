"""The `zili` command: generate, chat, models, serve, bench, tune, keys, usage, extract."""

from __future__ import annotations

import dataclasses
import importlib
import signal
import sys
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from zili.cli_options import engine_options


@dataclasses.dataclass(frozen=True)
class LazyCommand:
    """A subcommand whose module is imported only when it runs (or when its own --help is asked for).

    `target` is "module:attribute": a typer command function or a typer.Typer sub-app. `help` is what
    `zili --help` lists for it without importing the module."""

    target: str
    help: str

    def load(self, name: str) -> Any:
        """The click command typer builds for the target (imports its module)."""
        module, _, attribute = self.target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        command: Any
        if isinstance(target, typer.Typer):
            command = typer.main.get_group(target)  # a sub-app: no completion options of its own
        else:  # a command function: typer builds it as a one-command app
            one = typer.Typer(add_completion=False)
            one.command(name, help=self.help)(target)
            command = typer.main.get_command(one)
        command.name, command.help = name, self.help
        return command


# The subcommands that live in modules of their own, imported only when one runs: `zili --help`,
# `zili models`, `zili keys` do not pay for torch, the engine, FastAPI or SQLAlchemy they do not use.
LAZY_COMMANDS = {  # in the order `zili --help` lists them
    "serve": LazyCommand("zili.server.launcher:serve", "Start the OpenAI-compatible HTTP server."),
    "tune": LazyCommand("zili.tune:tune", "Measure kernels and settings on this device; save the winners."),
    "usage": LazyCommand("zili.governance.cli:usage",
                         "Requests, tokens and cost per day, model or key, from the usage ledger."),
    "extract": LazyCommand("zili.extract:extract", "Fill a JSON schema from a document; the output always validates."),
    "bench": LazyCommand("zili.bench.cli:bench_app", "Benchmarks: offline, serving, and side by side with peers."),
    "keys": LazyCommand("zili.governance.cli:keys_app", "API keys with quotas, kept in zili's database."),
}


class _Commands(dict[str, Any]):
    """A group's commands by name; a LAZY_COMMANDS one is built on its first `commands[name]`."""

    def __missing__(self, name: str) -> Any:
        if name not in LAZY_COMMANDS:
            raise KeyError(name)
        self[name] = command = LAZY_COMMANDS[name].load(name)
        return command


class LazyGroup(TyperGroup):
    """The `zili` group: its own commands plus LAZY_COMMANDS (click's lazily loaded subcommands, with a
    placeholder carrying the name and help for listings, so `zili --help` imports none of them)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _Commands(self.commands)

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.commands, *(name for name in LAZY_COMMANDS if name not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        lazy = LAZY_COMMANDS.get(cmd_name)
        return TyperCommand(cmd_name, help=lazy.help) if lazy else None

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name in LAZY_COMMANDS:
            _ = self.commands[name]  # this one runs: build the real command
        elif name and not name.startswith("-") and name not in self.commands:
            for lazy in LAZY_COMMANDS:  # an unknown name: "did you mean" looks through every command
                _ = self.commands[lazy]
        return super().resolve_command(ctx, args)


app = typer.Typer(cls=LazyGroup, add_completion=False, no_args_is_help=True,
                  help="zili (自立): self-hosted LLM inference. Runs open-weight models on the machine you have.")

ModelOpt = typer.Option(None, "--model", "-m", help="Path to a .gguf file, an HF checkpoint directory, or an alias "
                        "(see `zili models`). Default: smollm2-135m.")
# One-shot and interactive commands start eagerly: compiling the decode step takes seconds (a minute
# or two the first time) and pays off over long outputs and many requests, as in `zili serve`.
ONE_SHOT_ENGINE_OPTIONS = ("dtype", "max_model_len", "kv_cache_memory", "kv_cache_dtype", "quantization", "threads",
                           "attention_backend", "use_tune_cache", "calibrate", "enforce_eager", "load_format",
                           "reasoning_parser", "speculative_config", "speculative_model",
                           "enable_jump_forward", "jump_forward_mode", "deterministic", "structured_outputs_backend")
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


if __name__ == "__main__":
    app()
