"""Structured output: JSON schema / regex / choice / EBNF constraints, decoded with xgrammar masks,
and tool calling (prompt rendering, constrained calls, parsers).

- `StructuredOutput` (spec.py): what a request asks for; `SamplingParams(structured=...)` takes one
  or a dict such as {"json": schema}.
- `GrammarBackend` (backend.py, imports xgrammar): compiles and caches grammars, one matcher per
  sequence, the per-step bitmask applied to the batch's logits.
- tools.py: tools into the chat template (or a fallback), Hermes / Llama-3 tool-call parsers.
"""

from zili.structured.spec import StructuredOutput

__all__ = ["StructuredOutput"]
