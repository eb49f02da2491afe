"""Governance of a running server: who is calling, may they, what did it cost.

`Governance` is built by `zili serve` when a database is in use (an admin key, a database URL, or
a default database that holds keys). It then
- authenticates every /v1 request by a database key (or a static --api-key), caching keys in
  memory and polling the database each second, so a key created, changed or revoked from the CLI
  takes effect within a second, and from the admin API at once (in-flight streams of a revoked
  key are aborted);
- admits each request through the key's model list, the pause switch, the content policy and the
  quotas (zili.governance.quotas), before the engine queues it;
- writes one ledger row per request (and audit rows for refusals) through the batching writer;
- counts requests and tokens per key for /metrics, with the key's name as a label only for the
  keys the operator lists, all others summed under "other".
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine, delete

from zili import envs
from zili.governance.audit import AuditEvent, write_audit
from zili.governance.db import default_database_path, open_database
from zili.governance.keys import ApiKey, KeyStore, hash_secret
from zili.governance.ledger import LedgerWriter, UsageRecord
from zili.governance.policy import ContentClassifier, OutputScanner, PolicyHit, RegexPolicy
from zili.governance.prices import PriceTable
from zili.governance.quotas import Limits, QuotaExceededError, QuotaManager, Reservation
from zili.governance.reports import tokens_used_on
from zili.governance.schema import request_content
from zili.server.auth import key_matches
from zili.server.errors import APIError
from zili.server.generation import ChoiceDelta

if TYPE_CHECKING:
    from zili.server.generation import Generation
    from zili.server.hooks import RequestStatus

logger = logging.getLogger(__name__)

KEY_POLL_S = 1.0
OTHER_KEYS = "other"
STATIC_KEY = "static"


@dataclass
class GovernanceConfig:
    """What `zili serve` was told about governance."""

    database_url: str | None = None
    admin_key: str | None = None
    content_policy: Path | None = None
    log_content: bool = False
    log_retention_days: float = 30.0
    prices: Path | None = None
    metrics_keys: list[str] = field(default_factory=list)  # key names exported with their own label


@dataclass(frozen=True)
class Caller:
    """Who sent the request being served: a database key, or None for a static --api-key."""

    key: ApiKey | None
    endpoint: str
    remote_addr: str | None

    @property
    def name(self) -> str:
        return self.key.name if self.key is not None else STATIC_KEY


# Set by the auth dependency, read by `admit` in the same request's context (FastAPI awaits the
# dependency and the endpoint in one task, so the value is the caller of this very request).
_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("zili_caller", default=None)


@dataclass
class _Ticket:
    """What governance holds for one admitted request."""

    caller: Caller
    arrived: float
    started: float
    model: str
    reservation: Reservation | None
    scanner: OutputScanner | None
    texts: dict[int, str] | None  # choice -> text, only with --log-content
    prompt_text: str | None
    finish_reasons: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PauseState:
    message: str
    since: float


class Governance:
    """The RequestHooks of a governed server (see zili.server.hooks), and what the admin API acts on."""

    def __init__(self, config: GovernanceConfig, engine: Engine | None = None,
                 classifiers: list[ContentClassifier] | None = None) -> None:
        self.config = config
        self.db = engine if engine is not None else open_database(config.database_url)
        self.keys = KeyStore(self.db)
        self.prices = PriceTable.load(config.prices)
        self.classifiers: list[ContentClassifier] = list(classifiers or [])
        if config.content_policy is not None:
            self.classifiers.insert(0, RegexPolicy.load(config.content_policy))
        self.quotas = QuotaManager()
        self.ledger: LedgerWriter | None = None
        self.paused: PauseState | None = None
        self.static_keys: list[str] = []
        self.serving_engine: Any = None  # the AsyncEngine, for aborts
        self._by_hash: dict[str, ApiKey] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._running: dict[str, dict[str, Generation]] = {}  # key id -> request id -> request in flight
        self._polled_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._day_loads: dict[str, asyncio.Future[None]] = {}
        self._metrics_keys = set(config.metrics_keys)
        self.register_metrics(CollectorRegistry())  # build_app moves them onto the server's registry

    # ----- lifecycle -----

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.requests_total = Counter("zili_key_requests", "Requests by key (named keys only; others summed "
                                      "as 'other') and ledger status.", ["key", "status"], registry=registry)
        self.tokens_total = Counter("zili_key_tokens", "Prompt and completion tokens by key (named keys only).",
                                    ["key", "kind"], registry=registry)
        self.cost_total = Counter("zili_key_cost_usd", "Cost in US dollars from the price table, by key "
                                  "(named keys only).", ["key"], registry=registry)
        self.quota_rejections = Counter("zili_quota_rejections", "Requests refused by a quota, by limit.",
                                        ["limit"], registry=registry)
        self.policy_hits = Counter("zili_content_policy_hits", "Content-policy matches, by rule and where.",
                                   ["rule", "where"], registry=registry)
        self.paused_gauge = Gauge("zili_paused", "1 while the operator has paused admission.", registry=registry)

    async def start(self, serving_engine: Any) -> None:
        """Start the ledger writer, the key poller and the content-retention sweeper (on the server's loop)."""
        self.serving_engine = serving_engine
        self.ledger = LedgerWriter(self.db)
        await self._poll_keys()
        self._tasks.append(asyncio.create_task(self._poll_forever()))
        if self.config.log_content:
            self._tasks.append(asyncio.create_task(self._sweep_content_forever()))

    async def close(self) -> None:
        """Stop polling and write every queued ledger row (called after the drain on shutdown)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ledger is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.ledger.close)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(KEY_POLL_S)
            try:
                await self._poll_keys()
            except Exception:  # noqa: BLE001 - a database hiccup must not stop polling
                logger.exception("governance: polling keys failed")

    async def _poll_keys(self) -> None:
        since = self._polled_at - 5.0  # overlap: a commit may land with an older timestamp
        now = time.time()
        changed = await asyncio.to_thread(self.keys.changed_since, since)
        self._polled_at = now
        for key in changed:
            self.key_changed(key)

    async def _sweep_content_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.purge_content)
            except Exception:  # noqa: BLE001
                logger.exception("governance: purging logged content failed")
            await asyncio.sleep(3600)

    def purge_content(self) -> int:
        """Delete logged request/response bodies older than the retention period; returns rows deleted."""
        cutoff = time.time() - self.config.log_retention_days * 86400
        with self.db.begin() as connection:
            return connection.execute(delete(request_content).where(request_content.c.created_at < cutoff)).rowcount

    # ----- keys -----

    def key_changed(self, key: ApiKey) -> None:
        """A key was created, updated or revoked: refresh the cache; a dead key's requests are aborted."""
        self._by_hash[key.key_hash] = key
        if key.status() != "active":
            self.abort_key(key.id)

    def abort_key(self, key_id: str) -> int:
        """Abort every request in flight for `key_id`; returns how many."""
        running = list(self._running.get(key_id, {}).values())
        for gen in running:
            self._abort(gen)
        return len(running)

    def _abort(self, gen: Generation) -> None:
        if self.serving_engine is None:
            return
        for i in range(len(gen.prompts)):  # the stream ends with finish_reason "abort"
            self.serving_engine.abort(gen.engine_request_id(i))

    async def authenticate(self, token: str | None, endpoint: str, remote_addr: str | None) -> Caller:
        """The caller for a bearer token, or 401. Static keys are compared in constant time."""
        if token is None:
            self._audit_rejection(None, remote_addr, endpoint, "missing_api_key")
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if self.static_keys and key_matches(token, self.static_keys):
            caller = Caller(None, endpoint, remote_addr)
        else:
            key = await self.lookup(token)
            reason = "invalid_api_key" if key is None else key.status()
            if key is None or reason != "active":
                self._audit_rejection(key, remote_addr, endpoint, reason)
                message = {"revoked": "This API key has been revoked.",
                           "expired": "This API key has expired."}.get(reason, "Incorrect API key provided.")
                raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            caller = Caller(key, endpoint, remote_addr)
        _caller.set(caller)
        return caller

    async def lookup(self, token: str) -> ApiKey | None:
        """The key whose secret is `token` (cache first, then the database), or None."""
        key_hash = hash_secret(token)
        key = self._by_hash.get(key_hash)
        if key is None:
            key = await asyncio.to_thread(self.keys.by_hash, key_hash)
            if key is not None:
                self._by_hash[key_hash] = key
        return key

    def is_user_key(self, token: str) -> bool:
        """Whether `token` is a user's key (static or cached), for the admin API's 403."""
        return bool(self.static_keys and key_matches(token, self.static_keys)) or hash_secret(token) in self._by_hash

    def audit_admin(self, event: AuditEvent) -> None:
        """Write an admin action to the audit log now (not batched: it must be there when we answer)."""
        with self.db.begin() as connection:
            write_audit(connection, event)

    # ----- pause -----

    def pause(self, message: str, abort: bool) -> None:
        self.paused = PauseState(message, time.time())
        self.paused_gauge.set(1)
        if abort and self.serving_engine is not None:
            self.serving_engine.abort_all()

    def resume(self) -> None:
        self.paused = None
        self.paused_gauge.set(0)

    # ----- RequestHooks -----

    async def admit(self, gen: Generation) -> None:
        caller = _caller.get() or Caller(None, "unknown", None)
        arrived = time.time()
        model = gen.state.settings.served_model_name
        key = caller.key
        try:
            if self.paused is not None:
                raise APIError(503, self.paused.message, code="service_paused", headers={"Retry-After": "30"})
            if key is not None and not key.allows_model(model):
                raise APIError(403, f"This key may not use the model '{model}'.", type="permission_error",
                               param="model", code="model_not_allowed")
            prompt_text = self._check_prompt(gen)
            reservation = None
            if key is not None:
                await self._load_day_total(key)
                estimate = gen.prompt_tokens + gen.n * len(gen.prompts) * (gen.params.max_tokens or 0)
                limits = Limits(key.rpm, key.tpm, key.tokens_per_day, key.max_concurrency)
                try:
                    reservation = self.quotas.admit(key.id, key.name, limits, estimate)
                except QuotaExceededError as exc:
                    self.quota_rejections.labels(limit=exc.limit).inc()
                    raise APIError(429, exc.message, param=exc.limit, code="rate_limit_exceeded",
                                   headers={"Retry-After": str(exc.retry_after)}) from None
        except APIError as exc:
            self._record_rejection(gen, caller, model, arrived, exc)
            raise
        log = self.config.log_content
        self._tickets[gen.request_id] = _Ticket(
            caller, arrived, time.perf_counter(), model, reservation,
            OutputScanner(self.classifiers) if self.classifiers else None, {} if log else None,
            prompt_text if log else None)
        if key is not None:
            self._running.setdefault(key.id, {})[gen.request_id] = gen

    def _check_prompt(self, gen: Generation) -> str | None:
        if not self.classifiers and not self.config.log_content:
            return None
        texts = [gen.state.tokenizer.decode(ids, skip_special_tokens=False) for ids in gen.prompts]
        for text in texts:
            for classifier in self.classifiers:
                hit = classifier.check(text, "prompt")
                if hit is not None:
                    self.policy_hits.labels(rule=hit.rule, where="prompt").inc()
                    raise APIError(400, f"The prompt was refused by this server's content policy (rule "
                                   f"'{hit.rule}').", code="content_policy_violation", param="messages")
        return "\n\n".join(texts)

    async def _load_day_total(self, key: ApiKey) -> None:
        day = self.quotas.needs_day_total(key.id)
        if day is None or key.tokens_per_day is None:
            return
        pending = self._day_loads.get(key.id)
        if pending is None:  # one database read per key and day, however many requests wait for it
            pending = asyncio.ensure_future(self._read_day_total(key.id, day))
            self._day_loads[key.id] = pending
        try:
            await asyncio.shield(pending)
        except Exception as exc:  # the database is unreachable: refuse rather than admit past the quota
            logger.error("governance: reading today's usage of key %s failed: %s", key.name, exc)
            raise APIError(503, "The usage database is unavailable; retry shortly.", code="governance_unavailable",
                           headers={"Retry-After": "5"}) from None
        finally:
            if pending.done():
                self._day_loads.pop(key.id, None)

    async def _read_day_total(self, key_id: str, day: str) -> None:
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.flush)
        total = await asyncio.to_thread(tokens_used_on, self.db, key_id, day)
        self.quotas.set_day_total(key_id, day, total)

    def on_deltas(self, gen: Generation, deltas: list[ChoiceDelta]) -> list[ChoiceDelta]:
        ticket = self._tickets.get(gen.request_id)
        if ticket is None:
            return deltas
        if ticket.scanner is None and ticket.texts is None:  # the common case, once per step per request
            for delta in deltas:
                if delta.finish_reason is not None:
                    ticket.finish_reasons[delta.index] = delta.finish_reason
            return deltas
        for i, delta in enumerate(deltas):
            if delta.finish_reason is not None:
                ticket.finish_reasons[delta.index] = delta.finish_reason
            if ticket.texts is not None:
                ticket.texts[delta.index] = ticket.texts.get(delta.index, "") + delta.text
            hit = ticket.scanner.feed(delta.index, delta.text) if ticket.scanner is not None else None
            if hit is not None:
                return deltas[:i] + self._filter(gen, ticket, delta, hit)
        return deltas

    def _filter(self, gen: Generation, ticket: _Ticket, delta: ChoiceDelta, hit: PolicyHit) -> list[ChoiceDelta]:
        """End the whole request: the offending text is withheld, every choice ends as content_filter."""
        self.policy_hits.labels(rule=hit.rule, where=hit.where).inc()
        self._audit(ticket.caller, "content_policy.hit", gen.request_id, {"rule": hit.rule, "where": hit.where})
        ended = [ChoiceDelta(delta.index, "", [], None, "content_filter")]
        ended += [d for d in gen.stop("content_filter") if d.index != delta.index]
        for d in ended:
            ticket.finish_reasons[d.index] = "content_filter"
        return ended

    def finished(self, gen: Generation, status: RequestStatus) -> None:
        ticket = self._tickets.pop(gen.request_id, None)
        if ticket is None:
            return
        key = ticket.caller.key
        if key is not None:
            running = self._running.get(key.id)
            if running is not None:
                running.pop(gen.request_id, None)
                if not running:
                    del self._running[key.id]
        usage = gen.usage() if status != "rejected" else None
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
        details = getattr(usage, "completion_tokens_details", None)
        reasoning = (getattr(details, "reasoning_tokens", 0) or 0) if details is not None else 0
        if ticket.reservation is not None:
            self.quotas.settle(ticket.reservation, prompt + completion)
        reasons = set(ticket.finish_reasons.values())
        finish = reasons.pop() if len(reasons) == 1 else (None if not reasons else "mixed")
        if status == "ok" and "abort" in ticket.finish_reasons.values():
            status = "aborted"
        cost = self.prices.for_model(ticket.model).cost(prompt, cached or 0, completion)
        self._ledger(UsageRecord(gen.request_id, ticket.arrived, key.id if key else None, ticket.caller.name,
                                 ticket.model, ticket.caller.endpoint, prompt, cached or 0, completion, reasoning,
                                 time.perf_counter() - ticket.started, status, finish, cost))
        label = self._label(ticket.caller)
        self.tokens_total.labels(key=label, kind="prompt").inc(prompt)
        self.tokens_total.labels(key=label, kind="completion").inc(completion)
        self.cost_total.labels(key=label).inc(cost)
        if ticket.texts is not None and self.ledger is not None and status != "rejected":
            self.ledger.add_content({"request_id": gen.request_id[:80], "created_at": ticket.arrived,
                                     "key_id": key.id if key else None, "prompt": ticket.prompt_text or "",
                                     "completion": "\n\n".join(ticket.texts[i] for i in sorted(ticket.texts))})

    # ----- records -----

    def _label(self, caller: Caller) -> str:
        return caller.name if caller.name in self._metrics_keys else OTHER_KEYS

    def _ledger(self, record: UsageRecord) -> None:
        label = record.key_name if record.key_name in self._metrics_keys else OTHER_KEYS
        self.requests_total.labels(key=label, status=record.status).inc()
        if self.ledger is not None:
            self.ledger.add_usage(record)

    def _record_rejection(self, gen: Generation, caller: Caller, model: str, arrived: float,
                          exc: APIError) -> None:
        key = caller.key
        self._ledger(UsageRecord(gen.request_id, arrived, key.id if key else None, caller.name, model,
                                 caller.endpoint, 0, 0, 0, 0, time.time() - arrived, "rejected",
                                 None, 0.0))
        self._audit(caller, "request.rejected", gen.request_id,
                    {"status": exc.status, "code": exc.code, "limit": exc.param, "message": exc.message[:300]})

    def _audit_rejection(self, key: ApiKey | None, remote_addr: str | None, endpoint: str, reason: str) -> None:
        self._audit(Caller(key, endpoint, remote_addr), "request.rejected", None,
                    {"status": 401, "code": reason, "endpoint": endpoint})

    def _audit(self, caller: Caller, action: str, target: str | None, detail: dict[str, Any]) -> None:
        if self.ledger is None:
            return
        if caller.key is not None:
            actor = f"key:{caller.key.name}"
        elif detail.get("code") in ("missing_api_key", "invalid_api_key"):
            actor = "anonymous"
        else:
            actor = STATIC_KEY
        self.ledger.add_audit(AuditEvent(actor, action, target, {**detail, "endpoint": caller.endpoint},
                                         caller.remote_addr).row())


def build_governance(config: GovernanceConfig) -> Governance | None:
    """The Governance `zili serve` runs with, or None for a plain server.

    Governance is on when the operator asks for any part of it (an admin key, a database URL or
    $ZILI_DATABASE_URL, a content policy, content logging), or when the default database already
    holds active keys: keys made with `zili keys create` are then never silently ignored. Raises
    ValueError for bad options and sqlalchemy errors when the database cannot be opened.
    """
    asked = (config.admin_key or config.database_url or envs.database_url()
             or config.content_policy is not None or config.log_content)
    if not asked:
        if not default_database_path().exists():
            return None
        db = open_database(None)
        if not KeyStore(db).count_active():
            db.dispose()
            return None
        return Governance(config, db)
    return Governance(config)
