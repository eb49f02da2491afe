"""Cost per token from an hourly machine price, and energy per token from a power draw.

The default price is a public on-demand list price for a cloud VM of this machine's class
(2 vCPUs of a Sapphire Rapids Xeon): AWS EC2 r7i.large (2 vCPU, 16 GiB, Linux, us-east-1,
on-demand) at $0.1323/hour. It is the nearest standard shape to the 2-vCPU / 24 GiB development
VM these numbers are taken on; pass --price-per-hour for your own machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_PRICE_PER_HOUR = 0.1323
DEFAULT_PRICE_SOURCE = ("AWS EC2 r7i.large (2 vCPU Xeon Sapphire Rapids, 16 GiB), Linux on-demand, us-east-1, "
                        "list price $0.1323/h as published on aws.amazon.com/ec2/pricing/on-demand "
                        "(recalled 2025; not re-checked offline)")


@dataclass(frozen=True)
class CostBasis:
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR
    source: str = DEFAULT_PRICE_SOURCE
    watts: float | None = None  # average power draw of the machine while serving, when known

    def __post_init__(self) -> None:
        if self.price_per_hour < 0:
            raise ValueError(f"price per hour must be >= 0, got {self.price_per_hour}")
        if self.watts is not None and self.watts <= 0:
            raise ValueError(f"watts must be > 0, got {self.watts}")

    def to_dict(self) -> dict:
        return asdict(self)


def dollars_per_million(tokens_per_second: float | None, price_per_hour: float) -> float | None:
    """What one million tokens cost when the machine makes `tokens_per_second` for its whole price.

    Each kind of token is charged the whole machine time (as a provider quoting a per-token price
    for one kind would): $/1M = price_per_hour / (3600 * tok/s) * 1e6.
    """
    if not tokens_per_second or tokens_per_second <= 0:
        return None
    return price_per_hour / (3600.0 * tokens_per_second) * 1e6


def joules_per_token(tokens_per_second: float | None, watts: float | None) -> float | None:
    if not tokens_per_second or tokens_per_second <= 0 or watts is None:
        return None
    return watts / tokens_per_second


def cost_figures(output_tps: float | None, input_tps: float | None, basis: CostBasis) -> dict[str, float | None]:
    """The cost block every result carries."""
    out = {
        "usd_per_1m_output_tokens": dollars_per_million(output_tps, basis.price_per_hour),
        "usd_per_1m_input_tokens": dollars_per_million(input_tps, basis.price_per_hour),
    }
    if basis.watts is not None:
        jpt = joules_per_token(output_tps, basis.watts)
        out["joules_per_output_token"] = jpt
        out["wh_per_1m_output_tokens"] = None if jpt is None else jpt * 1e6 / 3600.0
        jin = joules_per_token(input_tps, basis.watts)
        out["joules_per_input_token"] = jin
    return out
