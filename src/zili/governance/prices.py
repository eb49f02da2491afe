"""Per-model token prices (US dollars per million input, cached-input and output tokens).

The default follows the machine's cost basis that `zili bench` uses (zili.bench.cost: an hourly
machine price divided by measured throughput). The throughputs are from the recorded CPU run
benchmarks/results/20261123T112409Z-offline-smollm2-cpu-attn-cpp.json (SmolLM2-135M on 2 cores):
831 output tokens/s at 32 sequences (the whole step, prefill included, charged to output) and
3,490 prompt tokens/s (pp512). A prefix-cache hit costs no prefill compute; it is charged a tenth
of the input price for the KV memory it holds. Operators give their own table with `--prices`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zili.bench.cost import DEFAULT_PRICE_PER_HOUR, dollars_per_million

REFERENCE_OUTPUT_TOKENS_PER_S = 831.2
REFERENCE_PROMPT_TOKENS_PER_S = 3490.1
CACHED_INPUT_SHARE = 0.1


@dataclass(frozen=True)
class TokenPrices:
    """US dollars per million tokens of each kind."""

    input: float
    cached_input: float
    output: float

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"price {name}: a finite number >= 0 (dollars per million tokens), got {value!r}")

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """Dollars for one request; cached tokens are part of prompt_tokens (OpenAI's usage)."""
        cached = min(cached_tokens, prompt_tokens)
        return ((prompt_tokens - cached) * self.input + cached * self.cached_input
                + completion_tokens * self.output) / 1e6


def default_prices(price_per_hour: float = DEFAULT_PRICE_PER_HOUR) -> TokenPrices:
    """Prices that make the machine's hourly price back at the reference throughputs."""
    input_price = dollars_per_million(REFERENCE_PROMPT_TOKENS_PER_S, price_per_hour) or 0.0
    output_price = dollars_per_million(REFERENCE_OUTPUT_TOKENS_PER_S, price_per_hour) or 0.0
    return TokenPrices(input=input_price, cached_input=input_price * CACHED_INPUT_SHARE, output=output_price)


@dataclass(frozen=True)
class PriceTable:
    """Prices by served model name, with a default for the rest."""

    default: TokenPrices
    models: dict[str, TokenPrices]

    def for_model(self, model: str) -> TokenPrices:
        return self.models.get(model, self.default)

    @classmethod
    def load(cls, path: Path | None) -> PriceTable:
        """The default table, or a JSON file: {"default": {...}, "models": {"name": {"input": 0.1,
        "cached_input": 0.01, "output": 0.4}}}. Raises ValueError naming the bad entry."""
        if path is None:
            return cls(default_prices(), {})
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--prices {path}: {exc}") from None
        if not isinstance(data, dict) or not set(data) <= {"default", "models"}:
            raise ValueError(f"--prices {path}: expected an object with 'default' and/or 'models'")
        default = _prices(data["default"], "default") if "default" in data else default_prices()
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise ValueError(f"--prices {path}: 'models' must map model names to prices")
        return cls(default, {str(name): _prices(p, f"models.{name}") for name, p in models.items()})


def _prices(entry: Any, where: str) -> TokenPrices:
    if not isinstance(entry, dict) or not set(entry) <= {"input", "cached_input", "output"} \
            or "input" not in entry or "output" not in entry:
        raise ValueError(f"--prices {where}: expected {{'input', 'output'[, 'cached_input']}} in $ per 1M tokens")
    cached: Any = entry.get("cached_input")
    if cached is None and isinstance(entry["input"], (int, float)):
        cached = entry["input"] * CACHED_INPUT_SHARE
    try:
        return TokenPrices(entry["input"], cached, entry["output"])
    except ValueError as exc:
        raise ValueError(f"--prices {where}: {exc}") from None
