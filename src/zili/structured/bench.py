"""The cost of structured output: decode throughput of N concurrent constrained streams against
N unconstrained ones, on the same engine, prompts and token counts.

    python -m zili.structured.bench [--model smollm2-135m] [--streams 32] [--tokens 64] [--repeats 3]

Both sides generate exactly streams x tokens tokens (ignore_eos; the schema needs far more tokens
than that to finish), and the timed part is decode only: the first step of each run (prefill)
is left out. Runs alternate (free, constrained, free, ...) so that drifting machine load hits
both sides alike; the ratio reported is the median over (free, constrained) pairs. Everything is
printed as JSON, and written with --out.
On a busy machine that ratio is noisy, so each constrained run also times everything the
grammar adds (bitmask fill and application, matcher advance): `ratio_from_grammar_share` is
1 - that share of its decode time, a figure the machine's drift cannot move much.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# Long enough that no stream finishes inside the measured tokens; mixes strings, enums, numbers,
# patterns and nesting, so the matcher walks through every kind of state.
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


def decode_throughput(llm, structured, streams: int, tokens: int) -> dict:
    from zili.sampling import SamplingParams

    engine = llm.engine
    prompt = llm.render_chat([{"role": "user", "content": PROMPT}])
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=tokens, ignore_eos=True, structured=structured)
    for i in range(streams):
        engine.add_request(f"bench-{i}", prompt, params)
    timer = _GrammarTimer(engine) if structured is not None else None
    steps, start, generated_at_start = 0, None, 0
    try:
        while engine.has_unfinished_requests():
            outputs = engine.step()
            steps += 1
            if start is None and engine.stats().num_waiting == 0:  # every stream is decoding from here on
                start, generated_at_start = time.perf_counter(), engine.generation_tokens_total
                if timer is not None:
                    timer.seconds = 0.0
            for out in outputs:
                assert not out.finished or all(c.finish_reason == "length" for c in out.outputs), out
    finally:
        if timer is not None:
            timer.restore()
    elapsed = time.perf_counter() - start
    decoded = engine.generation_tokens_total - generated_at_start
    row = {"decode_tokens": decoded, "decode_seconds": round(elapsed, 3),
           "tokens_per_second": round(decoded / elapsed, 2), "steps": steps}
    if timer is not None:  # the grammar's share of this very run: immune to the machine's drift
        row["grammar_seconds"] = round(timer.seconds, 3)
        row["grammar_share"] = round(timer.seconds / elapsed, 4)
    return row


class _GrammarTimer:
    """Times everything structured output adds to a step: the bitmask fill, its application to the
    logits, and advancing the matchers."""

    def __init__(self, engine) -> None:
        self.engine, self.seconds = engine, 0.0
        backend = engine._grammar_backend
        build, advance = backend.build_mask, engine._advance_grammar

        def timed_build(seqs):
            t = time.perf_counter()
            mask = build(seqs)
            if mask is not None:
                apply = mask.apply

                def timed_apply(logits):
                    t0 = time.perf_counter()
                    apply(logits)
                    self.seconds += time.perf_counter() - t0
                mask.apply = timed_apply
            self.seconds += time.perf_counter() - t
            return mask

        def timed_advance(seq, token_id):
            t = time.perf_counter()
            done = advance(seq, token_id)
            self.seconds += time.perf_counter() - t
            return done

        backend.build_mask, engine._advance_grammar = timed_build, timed_advance
        self._restore = lambda: (delattr(backend, "build_mask"), delattr(engine, "_advance_grammar"))

    def restore(self) -> None:
        self._restore()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args(argv)

    from zili.engine.llm import LLM
    from zili.structured.spec import StructuredOutput

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.streams, max_model_len=1024)
    structured = StructuredOutput.json(SCHEMA)
    llm.engine.compile_structured(structured)  # compile time is not decode time
    decode_throughput(llm, None, min(args.streams, 4), 4)  # warm-up
    runs: dict[str, list[dict]] = {"unconstrained": [], "constrained": []}
    for _ in range(args.repeats):
        runs["unconstrained"].append(decode_throughput(llm, None, args.streams, args.tokens))
        runs["constrained"].append(decode_throughput(llm, structured, args.streams, args.tokens))
    medians = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in runs.items()}
    pairs = [c["tokens_per_second"] / u["tokens_per_second"]
             for u, c in zip(runs["unconstrained"], runs["constrained"])]
    share = statistics.median(r["grammar_share"] for r in runs["constrained"])
    record = {
        "benchmark": "structured-output decode throughput",
        "command": "python -m zili.structured.bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "config": {"model": args.model or "smollm2-135m", "streams": args.streams, "tokens": args.tokens,
                   "repeats": args.repeats, "device": str(llm.engine.platform.device)},
        "machine": _machine(),
        "runs": runs,
        "median_tokens_per_second": medians,
        "ratio_of_medians": round(medians["constrained"] / medians["unconstrained"], 3),
        # Each constrained run against the unconstrained run just before it (same machine load, roughly).
        "pair_ratios": [round(r, 3) for r in pairs],
        "ratio_constrained_over_unconstrained": round(statistics.median(pairs), 3),
        # Within-run measure: decode time left to the model when the grammar's own time is taken out.
        "grammar_share_of_decode_time": share,
        "ratio_from_grammar_share": round(1 - share, 3),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return record


def _machine() -> dict:
    try:
        from zili.bench.machine import machine_info
    except ImportError:
        return {}
    info = machine_info()
    info.get("cpu", {}).pop("flags", None)
    return info


if __name__ == "__main__":
    main()
