"""The cost of structured output: decode throughput of N concurrent constrained streams against
N unconstrained ones.

    python -m benchmarks structured [--model smollm2-135m] [--streams 32] [--tokens 48] [--repeats 3]

Two engines hold the same model: one runs N free streams, the other N streams under a JSON schema
(long enough that none finishes). Their decode steps alternate, one step each in turn, and only
the step calls are timed, so a shared machine's drifting load falls on both sides alike. Both sides
generate exactly N x tokens tokens (ignore_eos); the prefill step is not timed. Each constrained
round also times everything the grammar itself adds (bitmask fill and application, matcher
advance). The JSON record (printed, and written with --out) has every round and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from zili.bench.machine import machine_info
from zili.engine.llm import LLM
from zili.sampling import SamplingParams
from zili.structured.spec import StructuredOutput

# Mixes strings, enums, numbers, patterns and nesting, so the matcher walks through every kind of state.
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 200, "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org|net)$"},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "age", "email", "role", "score", "tags"]}}},
    "required": ["records"],
}
PROMPT = "Write a JSON list of user records with name, age, email, role, score and tags."


class _Side:
    """One engine's streams in a round, with its own decode clock."""

    def __init__(self, llm, structured, streams: int, tokens: int) -> None:
        self.engine = llm.engine
        prompt = llm.render_chat([{"role": "user", "content": PROMPT}])
        params = SamplingParams(temperature=1.0, seed=0, max_tokens=tokens, ignore_eos=True, structured=structured)
        for i in range(streams):
            self.engine.add_request(f"bench-{i}", prompt, params)
        self.seconds, self.tokens_at_start = 0.0, 0
        self.timer = _GrammarTimer(self.engine) if structured is not None else None

    def prefill(self) -> None:
        while self.engine.stats().num_waiting:
            self.engine.step()
        self.tokens_at_start = self.engine.generation_tokens_total
        if self.timer is not None:
            self.timer.seconds = 0.0

    def step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        self.seconds += time.perf_counter() - start
        for out in outputs:
            assert not out.finished or all(c.finish_reason == "length" for c in out.outputs), out

    def result(self) -> dict:
        if self.timer is not None:
            self.timer.restore()
        decoded = self.engine.generation_tokens_total - self.tokens_at_start
        row = {"decode_tokens": decoded, "decode_seconds": round(self.seconds, 3),
               "tokens_per_second": round(decoded / self.seconds, 2)}
        if self.timer is not None:
            row["grammar_seconds"] = round(self.timer.seconds, 3)
            row["grammar_share"] = round(self.timer.seconds / self.seconds, 4)
        return row


def interleaved_round(free_llm, constrained_llm, structured, streams: int, tokens: int) -> dict:
    free, constrained = _Side(free_llm, None, streams, tokens), _Side(constrained_llm, structured, streams, tokens)
    free.prefill()
    constrained.prefill()
    while free.engine.has_unfinished_requests() or constrained.engine.has_unfinished_requests():
        for side in (free, constrained):
            if side.engine.has_unfinished_requests():
                side.step()
    row = {"unconstrained": free.result(), "constrained": constrained.result()}
    row["ratio"] = round(row["constrained"]["tokens_per_second"] / row["unconstrained"]["tokens_per_second"], 3)
    return row


class _GrammarTimer:
    """Times what structured output adds to a step: the bitmask fill, its application to the
    logits, and advancing the matchers."""

    def __init__(self, engine) -> None:
        self.seconds = 0.0
        from zili.engine.output_processor import SequenceOutputProcessor

        backend = engine.inputs.grammar_backend
        build, advance = backend.build_mask, SequenceOutputProcessor.advance_grammar

        def timed_build(seqs):
            start = time.perf_counter()
            mask = build(seqs)
            if mask is not None:
                apply = mask.apply

                def timed_apply(logits):
                    t0 = time.perf_counter()
                    apply(logits)
                    self.seconds += time.perf_counter() - t0
                mask.apply = timed_apply
            self.seconds += time.perf_counter() - start
            return mask

        def timed_advance(processor, token_id, delta):
            start = time.perf_counter()
            done = advance(processor, token_id, delta)
            self.seconds += time.perf_counter() - start
            return done

        # timing wrappers around the two grammar calls, removed by restore()
        backend.build_mask, SequenceOutputProcessor.advance_grammar = timed_build, timed_advance  # type: ignore[method-assign]

        def restore() -> None:
            del backend.build_mask
            SequenceOutputProcessor.advance_grammar = advance  # type: ignore[method-assign]
        self.restore = restore


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args(argv)

    options = dict(dtype=args.dtype, max_num_seqs=args.streams, max_model_len=1024)
    free_llm, constrained_llm = LLM(args.model, **options), LLM(args.model, **options)
    structured = StructuredOutput.json(SCHEMA)
    constrained_llm.engine.compile_structured(structured)  # compile time is not decode time
    interleaved_round(free_llm, constrained_llm, structured, min(args.streams, 4), 4)  # warm-up
    rounds = [interleaved_round(free_llm, constrained_llm, structured, args.streams, args.tokens)
              for _ in range(args.repeats)]
    record = {
        "benchmark": "structured-output decode throughput",
        "command": "python -m benchmarks structured " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"model": args.model or "smollm2-135m", "streams": args.streams, "tokens": args.tokens,
                   "repeats": args.repeats, "device": str(free_llm.engine.platform.device), "schema": SCHEMA},
        "machine": _machine(),
        "rounds": rounds,
        "median_tokens_per_second": {
            side: statistics.median(r[side]["tokens_per_second"] for r in rounds)
            for side in ("unconstrained", "constrained")},
        "ratio_constrained_over_unconstrained": statistics.median(r["ratio"] for r in rounds),
        "grammar_share_of_constrained_decode_time": statistics.median(r["constrained"]["grammar_share"]
                                                                      for r in rounds),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return record


def _machine() -> dict:
    info = machine_info()
    info.get("cpu", {}).pop("flags", None)
    return info


if __name__ == "__main__":
    main()
