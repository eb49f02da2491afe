"""`zili keys ...` and `zili usage` against SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from zili.cli import app
from zili.governance.audit import read_audit
from zili.governance.db import open_database
from zili.governance.keys import KeyStore, hash_secret
from zili.governance.ledger import LedgerWriter, UsageRecord

runner = CliRunner()


def zili(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_keys_create_list_show_update_revoke(database_url):
    db = ["--database-url", database_url]
    code, out = zili("keys", "create", "--name", "alice", "--models", "smollm2-135m,other", "--rpm", "60",
                     "--tpm", "10000", "--tokens-per-day", "1000000", "--max-concurrency", "4", "--expires", "30d",
                     "--json", *db)
    assert code == 0, out
    created = json.loads(out)
    assert {"id", "name", "key"} <= set(created) and created["name"] == "alice"
    assert created["models"] == ["smollm2-135m", "other"] and created["rpm"] == 60
    store = KeyStore(open_database(database_url))
    assert store.by_hash(hash_secret(created["key"])).id == created["id"]  # only the hash is kept

    code, out = zili("keys", "create", "--name", "bob", *db)
    assert code == 0 and "zk-" in out and "not" in out.lower()  # printed once, with the warning
    code, out = zili("keys", "create", "--name", "bob", *db)
    assert code == 2 and "already exists" in out

    code, out = zili("keys", "list", "--json", *db)
    assert [k["name"] for k in json.loads(out)] == ["alice", "bob"]
    assert all("key" not in k and "key_hash" not in k for k in json.loads(out))
    code, out = zili("keys", "list", *db)
    assert code == 0 and "alice" in out and "rpm=60" in out and created["key"] not in out

    code, out = zili("keys", "show", created["id"], "--json", *db)
    assert json.loads(out)["name"] == "alice" and json.loads(out)["status"] == "active"
    code, out = zili("keys", "update", "alice", "--rpm", "0", "--tpm", "50", "--all-models", "--json", *db)
    assert code == 0, out
    updated = json.loads(out)
    assert (updated["rpm"], updated["tpm"], updated["models"]) == (None, 50, None)
    code, out = zili("keys", "update", "alice", *db)
    assert code == 2 and "nothing to change" in out

    code, out = zili("keys", "revoke", "bob", *db)
    assert code == 0 and "revoked key 'bob'" in out
    code, out = zili("keys", "list", "--all", "--json", *db)
    assert {k["name"]: k["status"] for k in json.loads(out)} == {"alice": "active", "bob": "revoked"}
    for args in (("show", "nobody"), ("revoke", "nobody"), ("update", "nobody", "--rpm", "1")):
        code, out = zili("keys", *args, *db)
        assert code == 2 and "no key named" in out
    for args in (("--name", "bad name"), ("--name", "ok", "--rpm", "0"), ("--name", "ok", "--expires", "soon")):
        code, out = zili("keys", "create", *args, *db)
        assert code == 2 and "error" in out
    actions = [(a["actor"], a["action"]) for a in reversed(read_audit(store.engine))]
    assert actions == [("cli", "key.create"), ("cli", "key.create"), ("cli", "key.update"), ("cli", "key.revoke")]


def test_usage_report(database_url):
    engine = open_database(database_url)
    alice, _ = KeyStore(engine).create("alice")
    writer = LedgerWriter(engine)
    now = time.time()
    for i, (model, status) in enumerate([("m1", "ok"), ("m1", "ok"), ("m2", "rejected")]):
        writer.add_usage(UsageRecord(f"r{i}", now, alice.id, "alice", model, "/v1/completions",
                                     10 if status == "ok" else 0, 0, 6 if status == "ok" else 0, 0, 0.2, status,
                                     None, 0.01 if status == "ok" else 0.0))
    writer.add_usage(UsageRecord("old", now - 10 * 86400, None, None, "m1", "/v1/completions", 5, 0, 5, 0, 0.1,
                                 "ok", None, 0.02))
    writer.close()
    db = ["--database-url", database_url]
    code, out = zili("usage", "--by", "model", "--since", "1d", "--json", *db)
    assert code == 0, out
    rows = {r["model"]: r for r in json.loads(out)["data"]}
    assert rows["m1"]["requests"] == 2 and rows["m1"]["completion_tokens"] == 12
    assert rows["m2"]["rejected"] == 1 and rows["m1"]["cost_usd"] == pytest.approx(0.02)
    code, out = zili("usage", "--by", "key", "--json", *db)
    assert {r["key"]: r["requests"] for r in json.loads(out)["data"]} == {"alice": 3, "(static key)": 1}
    code, out = zili("usage", "--key", "alice", *db)
    assert code == 0 and "requests" in out and "0.020000" in out
    for args in (("--by", "week"), ("--since", "the dawn of time"), ("--key", "nobody")):
        code, out = zili("usage", *args, *db)
        assert code == 2 and "error" in out


def test_cli_refuses_an_unreachable_or_unsupported_database():
    code, out = zili("keys", "list", "--database-url", "mysql://u@h/db")
    assert code == 2 and "only sqlite" in out
    code, out = zili("keys", "list", "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert code == 2 and "cannot open the database" in out
