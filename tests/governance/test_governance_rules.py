"""Quotas, content policy and prices: the rules, without a database or a model."""

from __future__ import annotations

import math

import pytest

from zili.governance.policy import OUTPUT_WINDOW_CHARS, OutputScanner, PolicyHit, RegexPolicy
from zili.governance.prices import PriceTable, TokenPrices, default_prices
from zili.governance.quotas import Limits, QuotaExceededError, QuotaManager


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _refused(quotas: QuotaManager, limits: Limits, estimate: int) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as info:
        quotas.admit("k", "alice", limits, estimate)
    return info.value


def test_requests_per_minute_slide_and_say_when_to_retry():
    clock = Clock()
    quotas = QuotaManager(clock)
    limits = Limits(rpm=3)
    for dt in (0, 10, 20):
        clock.t += dt and 10
        quotas.settle(quotas.admit("k", "alice", limits, 5), 5)
    error = _refused(quotas, limits, 5)
    assert error.limit == "rpm" and "rpm" in error.message and "limit 3" in error.message
    assert error.retry_after == 40  # the oldest of the three leaves the window 60 s after it came
    clock.t += 40.5
    quotas.admit("k", "alice", limits, 5)


def test_tokens_per_minute_admit_on_the_estimate_and_settle_on_use():
    clock = Clock()
    quotas = QuotaManager(clock)
    limits = Limits(tpm=100)
    first = quotas.admit("k", "alice", limits, 60)  # prompt + max_tokens
    error = _refused(quotas, limits, 50)
    assert error.limit == "tpm" and error.retry_after == 60
    quotas.settle(first, 20)  # it used less: the rest is given back
    clock.t += 5
    second = quotas.admit("k", "alice", limits, 50)
    quotas.settle(second, 80)  # used more than admitted (charged in full)
    error = _refused(quotas, limits, 10)
    assert "used 100" in error.message and error.retry_after == 55
    too_big = _refused(quotas, limits, 101)
    assert "Request too large" in too_big.message and too_big.limit == "tpm"


def test_excess_is_charged_even_after_the_admission_left_the_window():
    clock = Clock()
    quotas = QuotaManager(clock)
    limits = Limits(tpm=100)
    long_request = quotas.admit("k", "alice", limits, 10)
    clock.t += 90  # the request ran past its minute
    quotas.settle(long_request, 95)  # 85 more than admitted, charged now
    assert _refused(quotas, limits, 20).limit == "tpm"
    quotas.admit("k", "alice", limits, 15)


def test_tokens_per_day_retry_after_midnight_utc():
    clock = Clock(86400 * 20000 + 3600)  # 01:00 UTC
    quotas = QuotaManager(clock)
    limits = Limits(tokens_per_day=1000)
    quotas.set_day_total("k", quotas.needs_day_total("k"), 900)  # what the ledger holds for today
    assert quotas.needs_day_total("k") is None
    error = _refused(quotas, limits, 200)
    assert error.limit == "tokens_per_day" and error.retry_after == 23 * 3600
    quotas.admit("k", "alice", limits, 100)
    clock.t += 23 * 3600  # the next UTC day starts from zero
    assert quotas.needs_day_total("k") is not None
    quotas.admit("k", "alice", limits, 1000)


def test_concurrency_is_released_at_settle():
    quotas = QuotaManager(Clock())
    limits = Limits(max_concurrency=2)
    held = [quotas.admit("k", "alice", limits, 1) for _ in range(2)]
    assert quotas.in_flight("k") == 2
    assert _refused(quotas, limits, 1).limit == "max_concurrency"
    quotas.settle(held[0], 1)
    quotas.settle(held[0], 1)  # settling twice releases once
    quotas.admit("k", "alice", limits, 1)
    assert quotas.in_flight("k") == 2


def test_no_limits_admit_everything_and_keys_are_separate():
    quotas = QuotaManager(Clock())
    for _ in range(1000):
        quotas.admit("free", "free", Limits(), 10**6)
    quotas.admit("k", "alice", Limits(rpm=1), 1)
    quotas.admit("other", "bob", Limits(rpm=1), 1)
    assert _refused(quotas, Limits(rpm=1), 1).limit == "rpm"


POLICY = """
[[rules]]
name = "secrets"
patterns = ['(?i)\\bpass(word)?\\s*[:=]', 'sk-[A-Za-z0-9]{8,}']

[[rules]]
name = "codenames"
words = ["Bluebird", "project x"]
applies_to = ["output"]
"""


def test_policy_rules_check_prompt_and_output(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    policy = RegexPolicy.load(path)
    assert policy.check("my PASSWORD: hunter2", "prompt") == PolicyHit("secrets", "prompt")
    assert policy.check("a key sk-abcdefgh123", "output") == PolicyHit("secrets", "output")
    assert policy.check("the bluebird sings", "prompt") is None  # output-only rule
    assert policy.check("the bluebird sings", "output") == PolicyHit("codenames", "output")
    assert policy.check("bluebirds and passports", "output") is None  # whole words only


def test_output_scanner_finds_a_match_split_across_deltas(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    scanner = OutputScanner([RegexPolicy.load(path)])
    assert scanner.feed(0, "We call it Blue") is None
    assert scanner.feed(1, "bird") is None  # another choice's text is separate
    assert scanner.feed(0, "bird, of course.") == PolicyHit("codenames", "output")
    scanner = OutputScanner([RegexPolicy.load(path)])
    assert scanner.feed(0, "Bluebird" + "." * (OUTPUT_WINDOW_CHARS * 2)) is not None


@pytest.mark.parametrize("text, message", [
    ("rules = 3", "rules"), ("[[rules]]\nname='x'", "give patterns or words"),
    ("[[rules]]\npatterns=['(unclosed']", "not a valid regular expression"),
    ("[[rules]]\nwords=['a']\napplies_to=['everywhere']", "applies_to"),
    ("[[rules]]\nwords=[1]", "words"), ("[[rules]]\nwords=['a']\nextra=1", "keys are"),
    ("not toml [", "--content-policy"), ("[[rules]]\nwords=['a']\n[other]\nx=1", "nothing else"),
])
def test_bad_policy_files_are_refused_clearly(tmp_path, text, message):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="--content-policy") as info:
        RegexPolicy.load(path)
    assert message in str(info.value)


def test_prices_follow_the_machine_cost_basis(tmp_path):
    default = default_prices()
    # $0.1323/h at 831.2 output tok/s: 0.1323 / (3600 * 831.2) * 1e6 dollars per million.
    assert default.output == pytest.approx(0.1323 / (3600 * 831.2) * 1e6)
    assert default.cached_input == pytest.approx(default.input / 10)
    assert default_prices(0.0).output == 0.0
    prices = TokenPrices(input=1.0, cached_input=0.1, output=4.0)
    # 1000 prompt tokens of which 400 cached, 500 completion tokens.
    assert prices.cost(1000, 400, 500) == pytest.approx((600 * 1.0 + 400 * 0.1 + 500 * 4.0) / 1e6)
    path = tmp_path / "prices.json"
    path.write_text('{"models": {"big": {"input": 2, "output": 8}}}')
    table = PriceTable.load(path)
    assert table.for_model("big").cached_input == pytest.approx(0.2)
    assert table.for_model("other") == default
    for bad in ('{"models": {"x": {"input": -1, "output": 1}}}', '{"default": {"input": 1}}', '[1]',
                '{"models": {"x": {"input": "1", "output": 1}}}', '{"models": {"x": {"input": NaN, "output": 1}}}'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="--prices"):
            PriceTable.load(path)
    assert math.isfinite(default.input)
