"""The governance database on SQLite and PostgreSQL: migrations, keys, audit, ledger, reports."""

from __future__ import annotations

import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError

from zili.governance.audit import AuditEvent, read_audit, write_audit
from zili.governance.db import current_revision, open_database, resolve_database_url
from zili.governance.keys import KeyNotFoundError, KeyStore, hash_secret
from zili.governance.ledger import LedgerWriter, UsageRecord
from zili.governance.reports import tokens_used_on, usage_report
from zili.governance.schema import api_keys, metadata, usage


def test_migrations_create_the_schema_once(database_url):
    engine = open_database(database_url)
    assert current_revision(engine) == "0001"
    assert {"api_keys", "usage", "audit_log", "request_content", "alembic_version"} <= set(
        inspect(engine).get_table_names())
    open_database(database_url)  # a second open is a no-op, not an error
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    # The migration and schema.py describe the same tables (index details aside).
    assert [d for d in diff if d[0] not in ("add_index", "remove_index")] == []


def test_alembic_is_imported_only_to_migrate(tmp_path):
    """A database already at the newest revision opens without importing Alembic (~10 MiB resident
    in the server); a new one, or one a revision behind, is migrated by it."""
    import subprocess
    import sys

    from zili.governance.db import head_revision

    url = f"sqlite:///{tmp_path / 'zili.db'}"
    probe = ("import sys; from zili.governance.db import open_database, current_revision; "
             f"e = open_database({url!r}); print('alembic' in sys.modules)")

    def opened_with_alembic() -> bool:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        return out.stdout.strip() == "True"

    assert head_revision() == "0001"
    assert opened_with_alembic()  # created and migrated
    assert current_revision(open_database(url, migrate=False)) == "0001"
    assert not opened_with_alembic()  # already there
    with open_database(url, migrate=False).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'an-older-one'"))
    with pytest.raises(Exception, match="an-older-one"):  # not silently taken as current: Alembic is asked
        open_database(url)


def test_sqlite_is_in_wal_mode(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'sub' / 'zili.db'}")  # the directory is created too
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_database_url_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("ZILI_DATABASE_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert resolve_database_url(None) == f"sqlite:///{tmp_path / 'zili' / 'zili.db'}"
    assert resolve_database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("ZILI_DATABASE_URL", "postgresql://u@h:5433/db")
    assert resolve_database_url(None) == "postgresql+psycopg://u@h:5433/db"
    with pytest.raises(ValueError, match="--database-url"):
        resolve_database_url("mysql://u@h/db")
    with pytest.raises(ValueError, match="--database-url"):
        resolve_database_url("not a url")


def test_keys_store_only_a_hash(database_url):
    engine = open_database(database_url)
    store = KeyStore(engine)
    key, secret = store.create("alice", models=["m1", "m2"], rpm=10, tpm=1000, tokens_per_day=10**6,
                               max_concurrency=2)
    assert secret.startswith("zk-") and len(secret) > 40
    with engine.connect() as connection:
        row = connection.execute(select(api_keys)).mappings().one()
    assert secret not in [str(v) for v in row.values()]
    assert row["key_hash"] == hash_secret(secret)
    assert store.by_hash(hash_secret(secret)) == key
    assert store.by_hash(hash_secret(secret + "x")) is None
    assert store.get("alice") == store.get(key.id) == key
    assert key.models == ("m1", "m2") and key.allows_model("m1") and not key.allows_model("m3")
    assert key.public()["status"] == "active" and "key_hash" not in key.public()


def test_key_names_are_unique_among_active_keys(database_url):
    store = KeyStore(open_database(database_url))
    first, _ = store.create("team-a")
    with pytest.raises(ValueError, match="name: an active key named 'team-a'"):
        store.create("team-a")
    store.revoke("team-a")
    second, _ = store.create("team-a")  # a revoked key's name may be reused
    assert store.get("team-a").id == second.id
    assert store.get(first.id).status() == "revoked"
    assert [k.id for k in store.list()] == [second.id]
    assert {k.id for k in store.list(include_revoked=True)} == {first.id, second.id}


@pytest.mark.parametrize("kwargs, field", [
    ({"name": ""}, "name"), ({"name": "has space"}, "name"), ({"name": "x" * 65}, "name"),
    ({"name": "<script>"}, "name"), ({"name": "ok", "rpm": 0}, "rpm"), ({"name": "ok", "tpm": -1}, "tpm"),
    ({"name": "ok", "tokens_per_day": 10**13}, "tokens_per_day"), ({"name": "ok", "max_concurrency": True},
                                                                   "max_concurrency"),
    ({"name": "ok", "models": []}, "models"), ({"name": "ok", "models": [""]}, "models"),
    ({"name": "ok", "expires_at": 1.0}, "expires"),
])
def test_bad_key_fields_name_the_field(tmp_path, kwargs, field):
    store = KeyStore(open_database(f"sqlite:///{tmp_path / 'z.db'}"))
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=f"^{field}"):
        store.create(name, **kwargs)


def test_update_and_revoke_are_audited(database_url):
    engine = open_database(database_url)
    store = KeyStore(engine)
    key, _ = store.create("bob", rpm=5)
    updated = store.update("bob", {"rpm": None, "tpm": 100, "models": ["m"]}, actor="admin")
    assert (updated.rpm, updated.tpm, updated.models) == (None, 100, ("m",))
    assert store.get("bob") == updated
    with pytest.raises(ValueError, match="^rpm"):
        store.update("bob", {"rpm": 0})
    with pytest.raises(ValueError, match="^key_hash"):
        store.update("bob", {"key_hash": "x"})
    revoked = store.revoke("bob", actor="admin")
    assert revoked.status() == "revoked" and store.revoke(key.id).revoked_at == revoked.revoked_at
    with pytest.raises(ValueError, match="revoked"):
        store.update(key.id, {"rpm": 3})
    with pytest.raises(KeyNotFoundError):
        store.get("nobody")
    actions = [(r["action"], r["actor"], r["target"]) for r in reversed(read_audit(engine))]
    assert actions == [("key.create", "cli", "bob"), ("key.update", "admin", "bob"), ("key.revoke", "admin", "bob")]
    assert read_audit(engine, action="key.update")[0]["detail"]["tpm"] == 100


def test_audit_log_is_append_only_in_the_database(database_url):
    engine = open_database(database_url)
    with engine.begin() as connection:
        write_audit(connection, AuditEvent("admin", "pause", None, {"message": "m"}))
    for statement in ("UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as connection:
                connection.execute(text(statement))
    assert [r["action"] for r in read_audit(engine)] == ["pause"]


def _record(i: int, key: str | None, model: str = "m", status: str = "ok", t: float | None = None) -> UsageRecord:
    return UsageRecord(f"req-{i}", t if t is not None else time.time(), key, key, model, "/v1/completions",
                       10, 4, 5, 0, 0.5, status, "length", 0.001)


def test_ledger_writer_loses_nothing_from_many_threads(database_url):
    engine = open_database(database_url)
    writer = LedgerWriter(engine, interval=0.05, max_batch=64)

    def produce(t: int) -> None:
        for i in range(100):
            writer.add_usage(_record(t * 1000 + i, f"k{t}"))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.flush()
    with engine.connect() as connection:
        assert connection.execute(select(usage.c.request_id)).scalars().all().__len__() == 800
    writer.add_usage(_record(99999, "late"))
    writer.close()  # close writes what is still queued
    with engine.connect() as connection:
        ids = set(connection.execute(select(usage.c.request_id)).scalars())
    assert len(ids) == 801 and "req-99999" in ids


def test_usage_report_groups_and_filters(database_url):
    engine = open_database(database_url)
    store = KeyStore(engine)
    alice, _ = store.create("alice")
    writer = LedgerWriter(engine)
    day1 = time.mktime((2026, 1, 5, 12, 0, 0, 0, 0, 0)) - time.timezone
    for i in range(3):
        writer.add_usage(UsageRecord(f"a{i}", day1, alice.id, "alice", "m1", "/v1/chat/completions", 10, 4, 5, 1, 0.1,
                                     "ok", "stop", 0.5))
    writer.add_usage(UsageRecord("b", day1 + 86400, None, None, "m2", "/v1/completions", 7, 0, 3, 0, 0.1, "ok",
                                 "length", 0.25))
    writer.add_usage(UsageRecord("c", day1 + 86400, alice.id, "alice", "m1", "/v1/completions", 0, 0, 0, 0, 0.0,
                                 "rejected", None, 0.0))
    writer.close()
    by_day = usage_report(engine, by="day")
    assert [(r["day"], r["requests"], r["ok"], r["rejected"]) for r in by_day] == [
        ("2026-01-05", 3, 3, 0), ("2026-01-06", 2, 1, 1)]
    assert by_day[0]["prompt_tokens"] == 30 and by_day[0]["cached_tokens"] == 12
    assert by_day[0]["completion_tokens"] == 15 and by_day[0]["total_tokens"] == 45
    assert by_day[0]["cost_usd"] == pytest.approx(1.5)
    by_key = {r["key"]: r for r in usage_report(engine, by="key")}
    assert set(by_key) == {"alice", "(static key)"} and by_key["alice"]["requests"] == 4
    assert [r["model"] for r in usage_report(engine, by="model")] == ["m1", "m2"]
    assert [r["day"] for r in usage_report(engine, by="day", since=day1 + 3600)] == ["2026-01-06"]
    assert usage_report(engine, by="model", key_id=alice.id)[0]["requests"] == 4
    assert tokens_used_on(engine, alice.id, "2026-01-05") == 45
    with pytest.raises(ValueError, match="^by"):
        usage_report(engine, by="week")
