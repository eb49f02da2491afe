"""The governance schema (SQLAlchemy Core): keys, the usage ledger, the audit log, logged content.

Times are UTC epoch seconds (floats) so that the same comparisons work on SQLite and PostgreSQL;
ledger rows also carry their UTC day ('YYYY-MM-DD') for per-day quotas and reports. The Alembic
migrations in `migrations/versions/` create exactly these tables; a test checks they agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants 64 bits for a ledger.
RowId = BigInteger().with_variant(Integer(), "sqlite")

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # "key_" + 24 hex digits, shown to operators
    Column("name", String(64), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex of the secret
    Column("key_prefix", String(16), nullable=False),  # first characters of the secret, to recognise it
    Column("models", Text, nullable=True),  # JSON list of model names the key may use; NULL: all
    Column("rpm", Integer, nullable=True),  # requests per minute
    Column("tpm", Integer, nullable=True),  # tokens (prompt + completion) per minute
    Column("tokens_per_day", BigInteger, nullable=True),  # per UTC day
    Column("max_concurrency", Integer, nullable=True),  # requests in flight at once
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    # One active key per name; a revoked key's name may be reused.
    Index("ix_api_keys_active_name", "name", unique=True, sqlite_where=text("revoked_at IS NULL"),
          postgresql_where=text("revoked_at IS NULL")),
    Index("ix_api_keys_updated_at", "updated_at"),
)

usage = Table(
    "usage",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("request_id", String(80), nullable=False),
    Column("created_at", Float, nullable=False),  # when the request arrived
    Column("day", String(10), nullable=False),  # its UTC day
    Column("key_id", String(32), nullable=True),  # NULL: a static --api-key or an open server
    Column("key_name", String(64), nullable=True),
    Column("model", String(256), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("reasoning_tokens", Integer, nullable=False, default=0),
    Column("latency_s", Float, nullable=False, default=0.0),
    Column("status", String(16), nullable=False),  # ok, error, aborted, rejected
    Column("finish_reason", String(32), nullable=True),
    Column("cost_usd", Float, nullable=False, default=0.0),
    Index("ix_usage_key_day", "key_id", "day"),
    Index("ix_usage_day", "day"),
    Index("ix_usage_created_at", "created_at"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),
    Column("actor", String(80), nullable=False),  # admin, cli, key:<name>, anonymous
    Column("action", String(64), nullable=False),  # key.create, key.revoke, key.update, pause, ...
    Column("target", String(128), nullable=True),
    Column("detail", Text, nullable=True),  # JSON
    Column("remote_addr", String(64), nullable=True),
    Index("ix_audit_log_created_at", "created_at"),
)

request_content = Table(
    "request_content",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("request_id", String(80), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("prompt", Text, nullable=False),
    Column("completion", Text, nullable=False),
    Index("ix_request_content_created_at", "created_at"),
)

LEDGER_STATUSES = ("ok", "error", "aborted", "rejected")
