"""Virtual API keys (LiteLLM's idea): a random secret shown once, stored only as its SHA-256.

A secret is `zk-` followed by 43 URL-safe base64 characters (256 random bits), so a plain SHA-256
is enough (no salt or slow hash: there is nothing to brute-force). Each key carries optional
limits (requests / tokens per minute, tokens per UTC day, requests in flight) and may be limited
to some model names. Every change is written to the audit log in the same transaction.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from zili.governance.audit import AuditEvent, write_audit
from zili.governance.schema import api_keys

SECRET_PREFIX = "zk-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_LIMIT = 10**12
LIMIT_FIELDS = ("rpm", "tpm", "tokens_per_day", "max_concurrency")


class KeyNotFoundError(LookupError):
    """No active key has this name or id."""


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a key's secret (what the database stores)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class ApiKey:
    """A key as stored (never its secret). Times are UTC epoch seconds; a None limit is no limit."""

    id: str
    name: str
    key_prefix: str
    key_hash: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    max_concurrency: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None

    def status(self, now: float | None = None) -> str:
        """active, expired or revoked."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (now if now is not None else time.time()) >= self.expires_at:
            return "expired"
        return "active"

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, Any]:
        """What the CLI and the admin API show: everything but the hash, times in ISO 8601."""
        out = {k: v for k, v in asdict(self).items() if k != "key_hash"}
        out["models"] = list(self.models) if self.models is not None else None
        for name in ("created_at", "updated_at", "expires_at", "revoked_at"):
            out[name] = iso(out[name])
        out["status"] = self.status()
        return out

    @classmethod
    def from_row(cls, row: Any) -> ApiKey:
        values = {f.name: row[f.name] for f in fields(cls)}
        values["models"] = tuple(json.loads(values["models"])) if values["models"] is not None else None
        return cls(**values)


def iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def parse_time(text: str, what: str, now: float | None = None, future: bool = True) -> float:
    """'30d', '12h', '90m' (from now: ahead if `future`, else back) or an ISO 8601 date / time -> epoch s.

    A date or time without a zone is taken as UTC. Raises ValueError naming `what`.
    """
    now = time.time() if now is None else now
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        return now + seconds if future else now - seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what}: expected a duration like 30d, 12h, 90m or an ISO 8601 date/time, "
                         f"got {text[:64]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError("name: 1-64 characters, letters, digits and _ . @ - (starting with a letter or digit)")
    return name


def check_limit(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"{field}: a whole number from 1 to {MAX_LIMIT}, or null for no limit")
    return value


def check_models(models: Any) -> tuple[str, ...] | None:
    if models is None:
        return None
    if (not isinstance(models, (list, tuple)) or not 1 <= len(models) <= 64
            or not all(isinstance(m, str) and 0 < len(m) <= 256 for m in models)):
        raise ValueError("models: a list of 1 to 64 model names (1-256 characters each), or null for all models")
    return tuple(dict.fromkeys(models))


class KeyStore:
    """Keys in the governance database. Methods raise ValueError (bad field, named) and
    KeyNotFoundError; each change writes an audit row in the same transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, name: str, *, models: list[str] | None = None, rpm: int | None = None,
               tpm: int | None = None, tokens_per_day: int | None = None, max_concurrency: int | None = None,
               expires_at: float | None = None, actor: str = "cli", remote_addr: str | None = None
               ) -> tuple[ApiKey, str]:
        """A new key and its secret (returned once, never stored)."""
        now = time.time()
        if expires_at is not None and expires_at <= now:
            raise ValueError("expires: the expiry time is in the past")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id="key_" + secrets.token_hex(12), name=check_name(name), key_prefix=secret[:10],
                     key_hash=hash_secret(secret), models=check_models(models),
                     rpm=check_limit("rpm", rpm), tpm=check_limit("tpm", tpm),
                     tokens_per_day=check_limit("tokens_per_day", tokens_per_day),
                     max_concurrency=check_limit("max_concurrency", max_concurrency),
                     created_at=now, updated_at=now, expires_at=expires_at)
        row = {**asdict(key), "models": json.dumps(list(key.models)) if key.models is not None else None}
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(api_keys), [row])
                write_audit(connection, AuditEvent(actor, "key.create", key.name, _audit_detail(key),
                                                   remote_addr, now))
        except IntegrityError:
            raise ValueError(f"name: an active key named {name!r} already exists") from None
        return key, secret

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as connection:
            return [ApiKey.from_row(r) for r in connection.execute(query).mappings()]

    def get(self, name_or_id: str) -> ApiKey:
        """The key with this id, else the active key with this name (else the newest revoked one)."""
        query = (select(api_keys).where((api_keys.c.id == name_or_id) | (api_keys.c.name == name_or_id))
                 .order_by(api_keys.c.revoked_at.is_not(None), api_keys.c.created_at.desc()))
        with self.engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
        by_id = [r for r in rows if r["id"] == name_or_id]
        if by_id or rows:
            return ApiKey.from_row((by_id or rows)[0])
        raise KeyNotFoundError(f"no key named or with id {name_or_id[:80]!r}")

    def by_hash(self, key_hash: str) -> ApiKey | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).mappings().first()
        if row is None or not same_hash(row["key_hash"], key_hash):
            return None
        return ApiKey.from_row(row)

    def changed_since(self, t: float) -> builtins.list[ApiKey]:
        """Keys created, changed or revoked at or after `t` (epoch s), for the server's key cache."""
        query = select(api_keys).where(api_keys.c.updated_at >= t)
        with self.engine.connect() as connection:
            return [ApiKey.from_row(r) for r in connection.execute(query).mappings()]

    def count_active(self) -> int:
        return len(self.list())

    def update(self, name_or_id: str, changes: dict[str, Any], *, actor: str = "cli",
               remote_addr: str | None = None) -> ApiKey:
        """Change limits, models or expiry (a None value removes that limit). Raises ValueError for a
        revoked key or a bad value."""
        key = self.get(name_or_id)
        if key.revoked_at is not None:
            raise ValueError(f"key {key.name!r} is revoked; create a new one")
        unknown = set(changes) - {*LIMIT_FIELDS, "models", "expires_at"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: not a field that can be changed")
        new: dict[str, Any] = {}
        for field, value in changes.items():
            if field in LIMIT_FIELDS:
                new[field] = check_limit(field, value)
            elif field == "models":
                new[field] = check_models(value)
            else:
                if value is not None and not isinstance(value, (int, float)):
                    raise ValueError("expires_at: epoch seconds or null")
                new[field] = value
        now = time.time()
        updated = replace(key, **new, updated_at=now)
        row = {k: v for k, v in new.items()}
        if "models" in row:
            row["models"] = json.dumps(list(row["models"])) if row["models"] is not None else None
        with self.engine.begin() as connection:
            connection.execute(update(api_keys).where(api_keys.c.id == key.id).values(**row, updated_at=now))
            detail = {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.items()}
            write_audit(connection, AuditEvent(actor, "key.update", key.name, {"id": key.id, **detail},
                                               remote_addr, now))
        return updated

    def revoke(self, name_or_id: str, *, actor: str = "cli", remote_addr: str | None = None) -> ApiKey:
        """Revoke a key (kept for the ledger; its name may be reused). Idempotent."""
        key = self.get(name_or_id)
        if key.revoked_at is not None:
            return key
        now = time.time()
        with self.engine.begin() as connection:
            connection.execute(update(api_keys).where(api_keys.c.id == key.id)
                               .values(revoked_at=now, updated_at=now))
            write_audit(connection, AuditEvent(actor, "key.revoke", key.name, {"id": key.id}, remote_addr, now))
        return replace(key, revoked_at=now, updated_at=now)


def _audit_detail(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "models": list(key.models) if key.models is not None else None,
            **{f: getattr(key, f) for f in LIMIT_FIELDS}, "expires_at": iso(key.expires_at)}
