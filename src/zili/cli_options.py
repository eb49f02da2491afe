"""Engine settings as command-line options, declared once for every command that builds an engine.

`zili serve`, `zili generate`, `zili chat`, `zili extract`, `zili tune` and `zili bench offline`
each take some of the `EngineConfig` fields as options. Their flag, type, default and help text
live here, in `ENGINE_OPTIONS`; a command names the ones it takes:

    @engine_options("dtype", "max_model_len", "enforce_eager")
    def generate(prompt: str, ..., engine_args: dict[str, Any]) -> None:
        llm = LLM(model, **engine_args)

The decorator adds the options to the command's signature (typer reads `__signature__`) and hands
the command one `engine_args` dict: EngineConfig field -> value, holding only the options the user
gave or that have a default other than EngineConfig's. Values are validated where they always are,
by `EngineConfig` (a ValueError naming the field).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, cast

import typer

from zili.choices import DTYPES, JUMP_FORWARD_MODES, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATION_MODES

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class EngineOption:
    """One EngineConfig field as a command-line option."""

    field: str  # the EngineConfig field it sets
    annotation: Any  # its Python type on the command line
    default: Any  # None: leave EngineConfig's default
    help: str
    flags: tuple[str, ...] = ()  # e.g. ("--enforce-eager/--compile",); default: --field-name
    min: int | None = None

    def parameter(self) -> inspect.Parameter:
        option = typer.Option(*self.flags, help=self.help, min=self.min, show_default=self.default is not None)
        return inspect.Parameter(self.field, inspect.Parameter.KEYWORD_ONLY, default=self.default,
                                 annotation=Annotated[self.annotation, option])


ENGINE_OPTIONS: dict[str, EngineOption] = {o.field: o for o in (
    EngineOption("dtype", str, "auto", f"Weights and activations dtype: {', '.join(DTYPES)} (or bf16, fp16, fp32)."),
    EngineOption("max_model_len", int | None, None, "Context length (default: the model's).", min=2),
    EngineOption("max_num_seqs", int | None, None, "Most sequences in one batch (default 64).", min=1),
    EngineOption("max_num_batched_tokens", int | None, None,
                 "Most tokens in one engine step (chunked prefill; default 2048, 1024 on a CPU computing in fp32).",
                 min=1),
    EngineOption("kv_cache_memory", str | None, None,
                 "KV pool size: bytes (512MiB, 2GiB, 1GB) or a fraction of free memory (0.2)."),
    EngineOption("kv_cache_dtype", str, "auto",
                 f"KV cache element type: {', '.join(KV_CACHE_DTYPES)}; int8 and fp8_e4m3 are quantized per token and "
                 "KV head (about twice the tokens in the same --kv-cache-memory; auto: the model's dtype, or bf16 rows "
                 "where an automatic dtype is fp32 on a CPU without native bf16)."),
    EngineOption("quantization", str, "auto",
                 f"Weights kept quantized in memory: {', '.join(QUANTIZATION_MODES)} (auto follows the GGUF)."),
    EngineOption("threads", int | None, None, "CPU threads (default: physical cores, or tuned).", min=1),
    EngineOption("attention_backend", str, "auto", "auto, sdpa, cpp (C++ CPU kernel) or triton."),
    EngineOption("use_tune_cache", bool, True, "Use the settings `zili tune` measured on this device.",
                 flags=("--tune-cache/--no-tune-cache",)),
    EngineOption("calibrate", bool | None, None,
                 "Measure the packed int4/int8 kernels of layer shapes the tune cache lacks at start (a few seconds, "
                 "then cached) (default: on; ZILI_CALIBRATE=0 turns it off).", flags=("--calibrate/--no-calibrate",)),
    EngineOption("enforce_eager", bool | None, None,
                 "Run every step eagerly, or compile the decode step (default: compiled on CPUs for `zili serve`, "
                 "eager for one-shot commands; ZILI_ENFORCE_EAGER=1 forces eager).",
                 flags=("--enforce-eager/--compile",)),
    EngineOption("load_format", str, "auto",
                 f"{' or '.join(LOAD_FORMATS)}: dummy fills seeded random weights on MODEL's architecture (a "
                 "directory with only config.json is enough), for load tests of shapes whose weights are not here."),
    EngineOption("reasoning_parser", str, "auto", "How a reasoning model's thinking is delimited: auto (from the "
                 "chat template), deepseek-r1, qwen3 or none."),
    EngineOption("speculative_config", str | None, None, "Speculative decoding as a JSON object, as vLLM takes it: "
                 '\'{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
                 "(draftless n-gram proposals from the request's own prompt and output), or "
                 '\'{"method": "draft_model", "model": "PATH", "num_speculative_tokens": 4}\' (a smaller model of the '
                 "same tokenizer proposes). Default: auto (n-gram, 5 tokens, n 2-4, for structured-output "
                 "requests only: JSON schema, regex, grammar); off: none."),
    EngineOption("speculative_model", str | None, None, "A draft model (path or alias) of the same tokenizer "
                 "proposes 5 tokens a step, verified by MODEL: shorthand for --speculative-config "
                 '\'{"method": "draft_model", "model": X, "num_speculative_tokens": 5}\'.'),
    EngineOption("enable_jump_forward", bool | None, None, "Jump-forward structured decoding: text the grammar "
                 "forces (JSON keys, punctuation) comes in one step (default: on, in verify mode).",
                 flags=("--enable-jump-forward/--no-enable-jump-forward",)),
    EngineOption("jump_forward_mode", str | None, None, f"{' or '.join(JUMP_FORWARD_MODES)}: verify (default) "
                 "proposes the forced text's tokens as speculative drafts the model checks under the grammar, so "
                 "greedy output is the same as without jump-forward (bit for bit under --deterministic; "
                 "otherwise up to near-ties, as with any batching); append adds the tokenizer's spelling of it "
                 "unverified (SGLang's jump-forward)."),
    EngineOption("deterministic", bool | None, None, "Batch-invariant kernels: a greedy or seeded request gets the "
                 "same tokens whatever else runs beside it and whatever the prefix cache holds (slower; "
                 "the decode step runs eagerly). Dense-attention models on one device.",
                 flags=("--deterministic/--no-deterministic",)),
    EngineOption("structured_outputs_backend", str, "auto", "The grammar library for structured output: xgrammar, "
                 "llguidance, or auto (xgrammar, and llguidance for a JSON schema xgrammar refuses)."),
    EngineOption("tensor_parallel_size", int, 1, "Split the model across this many ranks (processes, one device "
                 "each) with torch.distributed.", flags=("--tensor-parallel-size", "-tp"), min=1),
)}


def engine_options(*names: str, defaults: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Add the named `ENGINE_OPTIONS` to a typer command; it receives them as `engine_args`.

    `defaults` overrides an option's default for this command (e.g. eager one-shot commands).
    ValueError at import time for an unknown name or a command without an `engine_args` parameter."""
    unknown = [n for n in names if n not in ENGINE_OPTIONS]
    if unknown:
        raise ValueError(f"unknown engine options {unknown}; known: {', '.join(ENGINE_OPTIONS)}")
    overrides = defaults or {}

    def decorate(func: F) -> F:
        # Resolved annotations: typer reads Annotated[..., typer.Argument(...)] from this signature, and a
        # module with `from __future__ import annotations` would hand it strings.
        signature = inspect.signature(func, eval_str=True)
        if "engine_args" not in signature.parameters:
            raise ValueError(f"{func.__name__} must take an engine_args parameter to use engine_options")
        params = [p for p in signature.parameters.values() if p.name != "engine_args"]
        added = []
        for name in names:
            param = ENGINE_OPTIONS[name].parameter()
            if name in overrides:
                param = param.replace(default=overrides[name])
            added.append(param)
        # typer maps parameters in order; keyword-only options go after the command's own.
        positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params
                   if p.kind == inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            engine_args = {name: kwargs.pop(name) for name in names if name in kwargs}
            engine_args = {k: v for k, v in engine_args.items() if v is not None}
            return func(*args, engine_args=engine_args, **kwargs)

        # typer reads the options from __signature__, an attribute functions take but their type does not declare.
        wrapper.__signature__ = signature.replace(parameters=[*positional, *keyword, *added])  # type: ignore[attr-defined]
        return cast(F, wrapper)  # same call shape for typer: the options arrive as keywords, engine_args is filled

    return decorate
