"""Per-key quotas checked at admission: requests and tokens per minute, tokens per UTC day,
requests in flight.

Windows are sliding (the last 60 s), kept in memory by the server process. `admit` checks every
limit and reserves all of them in one synchronous call on the event loop, with no await between
check and reservation, so concurrent requests can never be admitted past a limit. Token limits
admit on an estimate (prompt tokens + n x max_tokens) and `settle` replaces it with what the request
really used, charging the excess in full when it used more (and refunding when it used less).
The per-day count starts from the ledger's rows of the day, so a restart forgets nothing that
was written. Several server processes on one database do not share their minute windows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0


class QuotaExceededError(Exception):
    """A limit would be passed: `limit` names it (rpm, tpm, tokens_per_day, max_concurrency)."""

    def __init__(self, limit: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    max_concurrency: int | None = None


@dataclass
class _Entry:
    at: float
    tokens: int


@dataclass
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[_Entry] = field(default_factory=deque)
    tokens_in_window: int = 0
    day: str = ""
    day_tokens: int = 0
    in_flight: int = 0

    def expire(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0].at <= cutoff:
            self.tokens_in_window -= self.tokens.popleft().tokens


@dataclass
class Reservation:
    """What one admitted request holds until `settle`."""

    key_id: str
    estimate: int
    entry: _Entry
    day: str
    settled: bool = False


def utc_day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


class QuotaManager:
    """Quota state of every key seen. Not thread-safe: call from the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._loaded_days: dict[str, str] = {}

    def needs_day_total(self, key_id: str) -> str | None:
        """The UTC day whose ledger total must be loaded (`set_day_total`) before admitting, or None."""
        day = utc_day(self.clock())
        return None if self._loaded_days.get(key_id) == day else day

    def set_day_total(self, key_id: str, day: str, tokens: int) -> None:
        """Start the day's count from the ledger (plus what this process reserved since)."""
        if self._loaded_days.get(key_id) == day:
            return
        state = self._keys.setdefault(key_id, _KeyState())
        if state.day != day:
            state.day, state.day_tokens = day, 0
        state.day_tokens += tokens
        self._loaded_days[key_id] = day

    def in_flight(self, key_id: str) -> int:
        state = self._keys.get(key_id)
        return state.in_flight if state else 0

    def admit(self, key_id: str, name: str, limits: Limits, estimate: int) -> Reservation:
        """Reserve one request of `estimate` tokens, or raise QuotaExceededError naming the limit."""
        now = self.clock()
        state = self._keys.setdefault(key_id, _KeyState())
        state.expire(now)
        day = utc_day(now)
        if state.day != day:
            state.day, state.day_tokens = day, 0
        who = f"key '{name}'"
        if limits.max_concurrency is not None and state.in_flight >= limits.max_concurrency:
            raise QuotaExceededError("max_concurrency", f"Rate limit reached for {who}: max_concurrency "
                                     f"({limits.max_concurrency} requests in flight). Retry when one finishes.", 1)
        if limits.rpm is not None and len(state.requests) >= limits.rpm:
            wait = state.requests[len(state.requests) - limits.rpm] + WINDOW_S - now
            raise QuotaExceededError("rpm", f"Rate limit reached for {who}: rpm (requests per minute, limit "
                                     f"{limits.rpm}).", _seconds(wait))
        if limits.tpm is not None and state.tokens_in_window + estimate > limits.tpm:
            if estimate > limits.tpm:
                raise QuotaExceededError("tpm", f"Request too large for {who}: it may use {estimate} tokens "
                                         f"(prompt + max_tokens), more than its tpm (tokens per minute) limit of "
                                         f"{limits.tpm}. Lower max_tokens.", int(WINDOW_S))
            raise QuotaExceededError("tpm", f"Rate limit reached for {who}: tpm (tokens per minute, limit "
                                     f"{limits.tpm}; used {state.tokens_in_window}, this request may use "
                                     f"{estimate}).", _seconds(self._tpm_wait(state, limits.tpm, estimate, now)))
        if limits.tokens_per_day is not None and state.day_tokens + estimate > limits.tokens_per_day:
            midnight = (math.floor(now / 86400) + 1) * 86400
            raise QuotaExceededError("tokens_per_day", f"Quota reached for {who}: tokens_per_day (limit "
                                     f"{limits.tokens_per_day} per UTC day; used {state.day_tokens}, this "
                                     f"request may use {estimate}).", _seconds(midnight - now))
        entry = _Entry(now, estimate)
        state.requests.append(now)
        state.tokens.append(entry)
        state.tokens_in_window += estimate
        state.day_tokens += estimate
        state.in_flight += 1
        return Reservation(key_id, estimate, entry, day)

    def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """The request ended having used `used_tokens` (prompt + completion): charge that instead."""
        if reservation.settled:
            return
        reservation.settled = True
        state = self._keys[reservation.key_id]
        state.in_flight -= 1
        delta = used_tokens - reservation.estimate
        now = self.clock()
        state.expire(now)
        if reservation.entry.at > now - WINDOW_S:  # still in the window (expire() dropped the older ones)
            reservation.entry.tokens += delta
            state.tokens_in_window += delta
        elif delta > 0:  # the window moved past its admission: charge the excess now
            state.tokens.append(_Entry(now, delta))
            state.tokens_in_window += delta
        if state.day == reservation.day:
            state.day_tokens += delta

    def _tpm_wait(self, state: _KeyState, limit: int, estimate: int, now: float) -> float:
        """Seconds until enough of the window's tokens expire for `estimate` more to fit."""
        excess = state.tokens_in_window + estimate - limit
        for entry in state.tokens:
            excess -= entry.tokens
            if excess <= 0:
                return entry.at + WINDOW_S - now
        return WINDOW_S


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
