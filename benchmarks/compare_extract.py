"""The extraction workload against llama-server (issue 20, item 6 and its first benchmark target).

`zili bench extract` runs the workload in-process through `zili.LLM`; this runs the same documents and
forms over HTTP against two servers started on the same GGUF, interleaved round by round:

  zili          `zili serve` with n-gram speculation and jump-forward structured decoding (both named
                in the record; the decode step compiled before the first request, not in the background)
  llama-server  with its own draftless speculation (`--spec-type ngram-*`, the setting given) and its
                JSON-schema grammar (`response_format: json_schema`, converted to GBNF by the server)

Each request is the chat request `zili extract` sends (`zili.extract.extraction_messages`), temperature
0, with the form as a strict `json_schema` response format; `streams` requests are kept in flight. A run
reports output tokens/s (completion tokens from each response's usage over the wall time), requests/s,
field accuracy against the generated documents' true values (`zili.bench.extract.score_outputs`),
invalid JSON and unfinished forms, and each engine's speculation counters where it reports them
(zili's /metrics, llama-server's per-response `timings.draft_n` / `draft_n_accepted`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from benchmarks.compare import log, server_round
from zili.bench.extract import ExtractionCase, score_outputs
from zili.bench.machine import load_average
from zili.bench.serve import discover_model_name
from zili.extract import extraction_messages

# zili's counters on /metrics (zili.server.metrics), read before and after a run.
_SPEC_COUNTERS = ("zili_spec_decode_num_draft_tokens_total", "zili_spec_decode_num_accepted_tokens_total",
                  "zili_generation_tokens_total", "zili_jump_forward_num_jumps_total",
                  "zili_jump_forward_num_forced_tokens_total", "zili_jump_forward_num_forced_draft_tokens_total")


def extraction_body(model: str, case: ExtractionCase, max_tokens: int) -> dict[str, Any]:
    """The OpenAI chat request for one case: the extraction prompt, the form as a strict json_schema."""
    return {"model": model, "messages": extraction_messages(case.schema, case.document), "max_tokens": max_tokens,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                "name": "form", "schema": case.schema, "strict": True}}}


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    out = {}
    for name in _SPEC_COUNTERS:
        found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.MULTILINE)
        if found:
            out[name] = float(found.group(1))
    return out


async def run_extract_http(url: str, cases: list[ExtractionCase], streams: int, max_tokens: int = 384,
                           timeout_s: float = 900.0) -> dict[str, Any]:
    """Send every case to the server at `url` with `streams` requests in flight; one result row.
    Raises httpx.HTTPStatusError on a refused request (a schema the server cannot compile is a
    failure of the run, not a silently skipped case)."""
    model = await discover_model_name(url)
    limit = asyncio.Semaphore(streams)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:

        async def one(case: ExtractionCase) -> tuple[str, str | None, int, dict[str, Any]]:
            async with limit:
                r = await client.post("/v1/chat/completions", json=extraction_body(model, case, max_tokens))
            r.raise_for_status()
            data = r.json()
            choice = data["choices"][0]
            return (choice["message"].get("content") or "", choice.get("finish_reason"),
                    int(data["usage"]["completion_tokens"]), data.get("timings") or {})

        before, load_before = await _metrics(client), load_average()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(c) for c in cases))
        duration = time.perf_counter() - t0
        after = await _metrics(client)
    row = score_outputs(cases, [(text, finish) for text, finish, _, _ in results])
    n_out = sum(n for _, _, n, _ in results)
    row.update({"streams": streams, "output_tokens": n_out, "duration_s": duration,
                "output_throughput": n_out / duration, "request_throughput": len(cases) / duration,
                "load_average_before": load_before, "load_average_after": load_average()})
    drafted = sum(int(t.get("draft_n", 0)) for _, _, _, t in results)
    if drafted:  # llama-server's per-response speculation figures
        accepted = sum(int(t.get("draft_n_accepted", 0)) for _, _, _, t in results)
        row["spec_decode"] = {"num_draft_tokens": drafted, "num_accepted_tokens": accepted,
                              "acceptance_rate": accepted / drafted}
    elif after.get(_SPEC_COUNTERS[0], 0) > before.get(_SPEC_COUNTERS[0], 0):
        drafted = int(after[_SPEC_COUNTERS[0]] - before.get(_SPEC_COUNTERS[0], 0))
        accepted = int(after.get(_SPEC_COUNTERS[1], 0) - before.get(_SPEC_COUNTERS[1], 0))
        row["spec_decode"] = {"num_draft_tokens": drafted, "num_accepted_tokens": accepted,
                              "acceptance_rate": accepted / drafted}
    jumps = {name: int(after.get(f"zili_jump_forward_{name}_total", 0) - before.get(f"zili_jump_forward_{name}_total", 0))
             for name in ("num_jumps", "num_forced_tokens", "num_forced_draft_tokens")}
    if jumps["num_jumps"]:  # zili's jump-forward: steps saved (forced tokens without a step) and forced drafts
        row["jump_forward"] = jumps
    return row


def extract_round(name: str, start_server: Callable[[], Any], cases: list[ExtractionCase], levels: list[int],
                  max_tokens: int, round_index: int, warmup: list[ExtractionCase]) -> list[dict[str, Any]]:
    """One engine's round (benchmarks.compare.server_round): warm the server up on `warmup` (other
    documents: no prefix-cache help), then run every stream level. One row per level."""

    def run_levels(server: Any) -> Iterator[dict[str, Any]]:
        asyncio.run(run_extract_http(server.url, warmup, 1, max_tokens))
        for c in levels:
            row = asyncio.run(run_extract_http(server.url, cases, c, max_tokens))
            row["test"] = f"extract-c{c}"
            yield row
            acc = "n/a" if row["field_accuracy"] is None else f"{row['field_accuracy']:.1%}"
            spec = row.get("spec_decode")
            spec_text = f"  accepted {spec['acceptance_rate']:.0%} of {spec['num_draft_tokens']}" if spec else ""
            log(f"[round {round_index}] {name:12s} c={c:<3d} out {row['output_throughput']:.1f} tok/s  "
                f"{row['request_throughput']:.3f} req/s  fields {acc}  invalid {row['invalid_json']}  "
                f"unfinished {row['unfinished']}{spec_text}  load {row['load_average_after']}")

    return server_round(name, start_server, round_index, run_levels)


def summarize_extract(runs: list[dict[str, Any]], levels: list[int], engines: list[str]) -> dict[str, Any]:
    """Per stream level: each engine's median output tokens/s, requests/s and field accuracy, and the
    ratio of the first engine's median to every other's, with the per-round ratios (interleaved)."""
    from zili.bench.stats import median

    out: dict[str, Any] = {}
    for c in levels:
        per: dict[str, list[dict]] = {e: [r for r in runs if r.get("engine") == e and r.get("test") == f"extract-c{c}"]
                                      for e in engines}
        level: dict[str, Any] = {e: {"output_throughput": median([r["output_throughput"] for r in rows]),
                                     "request_throughput": median([r["request_throughput"] for r in rows]),
                                     "field_accuracy": median([r["field_accuracy"] for r in rows
                                                               if r["field_accuracy"] is not None]),
                                     "invalid_json": sum(r["invalid_json"] for r in rows),
                                     "unfinished": sum(r["unfinished"] for r in rows), "rounds": len(rows)}
                                 for e, rows in per.items()}
        first = engines[0]
        for other in engines[1:]:
            a, b = level[first]["output_throughput"], level[other]["output_throughput"]
            by_round = {r["round"]: r["output_throughput"] for r in per[other]}
            level[f"{first}/{other}"] = {
                "output_throughput_ratio": a / b if a is not None and b else None,
                "per_round": [r["output_throughput"] / by_round[r["round"]] for r in per[first]
                              if by_round.get(r["round"])]}
        out[f"c{c}"] = level
    return out
