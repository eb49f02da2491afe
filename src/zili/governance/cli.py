"""`zili keys create|list|show|update|revoke` and `zili usage`: the governance database from a shell.

Every command takes --database-url (default: $ZILI_DATABASE_URL, else the SQLite file in zili's
data directory). A running server sees CLI changes within a second (it polls for changed keys).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from zili.governance.db import DATABASE_URL_ENV, open_database
from zili.governance.keys import KeyNotFoundError, KeyStore, iso, parse_time
from zili.governance.reports import GROUPS, usage_report

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create, list, show, update, revoke.")

DatabaseOpt = Annotated[Optional[str], typer.Option(
    "--database-url", envvar=DATABASE_URL_ENV,
    help="sqlite:///PATH or postgresql://USER@HOST/DB (default: zili.db in zili's data directory).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
LimitOpt = Optional[int]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _open(database_url: str | None) -> Engine:
    try:
        return open_database(database_url)
    except ValueError as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        _fail(f"cannot open the database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    raise AssertionError("unreachable")


def _models(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [m.strip() for v in values for m in v.split(",") if m.strip()] or None


def _limit(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        _fail(f"{flag} must be at least 1")
    return value


def _print_key(key: dict[str, Any]) -> None:
    limits = ", ".join(f"{k}={key[k]}" for k in ("rpm", "tpm", "tokens_per_day", "max_concurrency")
                       if key.get(k) is not None) or "no limits"
    models = ",".join(key["models"]) if key.get("models") else "all models"
    expires = f", expires {key['expires_at']}" if key.get("expires_at") else ""
    typer.echo(f"{key['name']:20} {key['id']:28} {key['status']:8} {key['key_prefix']}…  {models}; {limits}{expires}")


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="A unique name (letters, digits, _ . @ -).")],
    models: Annotated[Optional[list[str]], typer.Option(
        "--models", help="Models this key may use (repeat or comma-separate; default: all).")] = None,
    rpm: Annotated[LimitOpt, typer.Option("--rpm", help="Requests per minute.")] = None,
    tpm: Annotated[LimitOpt, typer.Option("--tpm", help="Tokens (prompt + completion) per minute.")] = None,
    tokens_per_day: Annotated[LimitOpt, typer.Option("--tokens-per-day", help="Tokens per UTC day.")] = None,
    max_concurrency: Annotated[LimitOpt, typer.Option("--max-concurrency", help="Requests in flight.")] = None,
    expires: Annotated[Optional[str], typer.Option(
        "--expires", help="A duration from now (30d, 12h) or an ISO 8601 date/time.")] = None,
    database_url: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print its secret (shown this once; only its hash is stored)."""
    store = KeyStore(_open(database_url))
    try:
        expires_at = parse_time(expires, "--expires") if expires is not None else None
        key, secret = store.create(name, models=_models(models), rpm=_limit("--rpm", rpm),
                                   tpm=_limit("--tpm", tpm),
                                   tokens_per_day=_limit("--tokens-per-day", tokens_per_day),
                                   max_concurrency=_limit("--max-concurrency", max_concurrency),
                                   expires_at=expires_at, actor="cli")
    except ValueError as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps({**key.public(), "key": secret}, indent=2))
        return
    typer.echo(f"created key '{key.name}' ({key.id})")
    typer.echo(f"  {secret}")
    typer.echo("Store this key now: zili keeps only its hash and cannot show it again.")


@keys_app.command("list")
def list_keys(
    include_revoked: Annotated[bool, typer.Option("--all", help="Also list revoked keys.")] = False,
    database_url: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List keys (never their secrets)."""
    keys = [k.public() for k in KeyStore(_open(database_url)).list(include_revoked)]
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    if not keys:
        typer.echo("no keys (create one with `zili keys create --name NAME`)")
    for key in keys:
        _print_key(key)


def _get(store: KeyStore, name_or_id: str) -> Any:
    try:
        return store.get(name_or_id)
    except KeyNotFoundError as exc:
        _fail(str(exc))


@keys_app.command("show")
def show(name_or_id: Annotated[str, typer.Argument(help="The key's name or id.")],
         database_url: DatabaseOpt = None, as_json: JsonOpt = False) -> None:
    """Show one key."""
    key = _get(KeyStore(_open(database_url)), name_or_id).public()
    if as_json:
        typer.echo(json.dumps(key, indent=2))
        return
    for field, value in key.items():
        typer.echo(f"{field:16} {value if value is not None else '-'}")


@keys_app.command("update")
def update(
    name_or_id: Annotated[str, typer.Argument(help="The key's name or id.")],
    models: Annotated[Optional[list[str]], typer.Option("--models", help="Models this key may use.")] = None,
    all_models: Annotated[bool, typer.Option("--all-models", help="Allow every model again.")] = False,
    rpm: Annotated[LimitOpt, typer.Option("--rpm", help="Requests per minute (0: no limit).")] = None,
    tpm: Annotated[LimitOpt, typer.Option("--tpm", help="Tokens per minute (0: no limit).")] = None,
    tokens_per_day: Annotated[LimitOpt, typer.Option("--tokens-per-day", help="Tokens per UTC day (0: no limit).")]
        = None,
    max_concurrency: Annotated[LimitOpt, typer.Option("--max-concurrency", help="Requests in flight (0: no limit).")]
        = None,
    expires: Annotated[Optional[str], typer.Option("--expires", help="A duration from now or an ISO time; "
                                                   "'never' removes the expiry.")] = None,
    database_url: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a key's limits, models or expiry (audited; a running server applies it within a second)."""
    changes: dict[str, Any] = {}
    for field, value in (("rpm", rpm), ("tpm", tpm), ("tokens_per_day", tokens_per_day),
                         ("max_concurrency", max_concurrency)):
        if value is not None:
            if value < 0:
                _fail(f"--{field.replace('_', '-')} must be 0 (no limit) or more")
            changes[field] = value or None
    if models and all_models:
        _fail("give --models or --all-models, not both")
    if models:
        changes["models"] = _models(models)
    if all_models:
        changes["models"] = None
    try:
        if expires is not None:
            changes["expires_at"] = None if expires == "never" else parse_time(expires, "--expires")
        if not changes:
            _fail("nothing to change: give --rpm, --tpm, --tokens-per-day, --max-concurrency, --models or --expires")
        key = KeyStore(_open(database_url)).update(name_or_id, changes, actor="cli")
    except KeyNotFoundError as exc:
        _fail(str(exc))
        return
    except ValueError as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(key.public(), indent=2))
    else:
        _print_key(key.public())


@keys_app.command("revoke")
def revoke(name_or_id: Annotated[str, typer.Argument(help="The key's name or id.")],
           database_url: DatabaseOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a key: refused from its next request on; a running server aborts its streams."""
    try:
        key = KeyStore(_open(database_url)).revoke(name_or_id, actor="cli")
    except KeyNotFoundError as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(key.public(), indent=2))
    else:
        typer.echo(f"revoked key '{key.name}' ({key.id}) at {iso(key.revoked_at)}")


def usage(
    key: Annotated[Optional[str], typer.Option("--key", help="Only this key (name or id).")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="A duration back (7d, 12h) or an ISO date/time.")]
        = None,
    by: Annotated[str, typer.Option("--by", help="Group by day, model or key.")] = "day",
    database_url: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests, tokens and cost from the usage ledger."""
    if by not in GROUPS:
        _fail(f"--by must be one of {', '.join(GROUPS)}, got {by!r}")
    engine = _open(database_url)
    try:
        since_t = parse_time(since, "--since", future=False) if since is not None else None
    except ValueError as exc:
        _fail(str(exc))
        return
    key_id = _get(KeyStore(engine), key).id if key is not None else None
    rows = usage_report(engine, by=by, since=since_t, key_id=key_id)
    if as_json:
        typer.echo(json.dumps({"by": by, "since": iso(since_t), "data": rows}, indent=2))
        return
    header = (f"{by:20} {'requests':>8} {'ok':>6} {'rejected':>8} {'aborted':>7} {'error':>5} {'prompt':>9} "
              f"{'cached':>8} {'completion':>10} {'cost $':>12}")
    typer.echo(header)
    for r in rows:
        typer.echo(f"{str(r[by])[:20]:20} {r['requests']:8} {r['ok']:6} {r['rejected']:8} {r['aborted']:7} "
                   f"{r['error']:5} {r['prompt_tokens']:9} {r['cached_tokens']:8} {r['completion_tokens']:10} "
                   f"{r['cost_usd']:12.8f}")
    if not rows:
        typer.echo("(no requests recorded)")
