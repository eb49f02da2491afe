"""Governance of a shared server: keys and accounts in a database, quotas at admission, a usage
and cost ledger, an append-only audit log, emergency pause, and a content policy.

- db.py: the database (SQLite in zili's data directory by default, or PostgreSQL) and migrations
- schema.py, migrations/: the tables (SQLAlchemy Core) and their Alembic revisions
- keys.py: virtual keys (hash-only storage) and their limits
- quotas.py: per-key admission limits; ledger.py: the batching ledger writer
- prices.py: cost per token; reports.py: usage totals; audit.py: the audit log
- policy.py: content policy rules and the classifier protocol
- service.py: the runtime that zili serve plugs in (zili.server.hooks); admin.py: /admin/v1
- cli.py: `zili keys ...` and `zili usage`
"""
