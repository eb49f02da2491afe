"""Opening the governance database: SQLite in zili's data directory by default, or PostgreSQL.

`open_database(url)` returns a SQLAlchemy Engine whose schema is at the newest Alembic revision
(the migrations shipped in this package run on every open; a database already there is a no-op).
Alembic itself (with Mako and Pygments: ~10 MiB resident in a server that would never use it again)
is imported only when a migration has to run: a database already at the newest revision is told so
by its `alembic_version` table, read with SQLAlchemy.
"""

from __future__ import annotations

import os
import re
import threading
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from zili import envs

if TYPE_CHECKING:
    from alembic.config import Config

DATABASE_URL_ENV = envs.ZILI_DATABASE_URL.name
_MIGRATIONS = Path(__file__).with_name("migrations")
_migrate_lock = threading.Lock()


def data_dir() -> Path:
    """zili's data directory: $XDG_DATA_HOME/zili, else ~/.local/share/zili (XDG base directories)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "zili"


def default_database_path() -> Path:
    return data_dir() / "zili.db"


def resolve_database_url(url: str | None) -> str:
    """The URL to use: `url`, else $ZILI_DATABASE_URL, else the SQLite file in the data directory.

    `postgresql://` and `postgres://` URLs are given the psycopg 3 driver. Raises ValueError for a
    URL SQLAlchemy cannot parse or a database other than SQLite / PostgreSQL.
    """
    url = url or envs.database_url() or f"sqlite:///{default_database_path()}"
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError: message names the URL
        raise ValueError(f"--database-url: cannot parse {url!r} ({exc})") from None
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.get_backend_name() != "sqlite":
        raise ValueError(f"--database-url: only sqlite:/// and postgresql:// databases are supported, got "
                         f"{parsed.get_backend_name()!r}")
    return parsed.render_as_string(hide_password=False)


def open_database(url: str | None = None, *, migrate: bool = True) -> Engine:
    """A SQLAlchemy Engine on the governance database, created and migrated to the newest schema.

    SQLite: the file (and its directory) is created on first use, in WAL mode so that the server's
    writer and `zili keys` / `zili usage` in other processes do not block each other. Raises
    ValueError for a bad URL and sqlalchemy.exc.OperationalError when the database is unreachable.
    """
    url = resolve_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # A pool of connections that any thread may check out (SQLAlchemy's default for a file), so
        # the ledger writer reuses one connection instead of opening the file for every batch.
        memory = parsed.database in (None, "", ":memory:")
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **({"poolclass": NullPool} if memory else {}))
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
    if migrate:
        upgrade(engine)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, no fsync per commit
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


@cache
def head_revision() -> str:
    """The newest shipped revision: the one no other migration file names as its `down_revision`
    (read from the files' text, so that Alembic need not be imported to know it). RuntimeError
    unless there is exactly one."""
    revisions, parents = set(), set()
    for path in (_MIGRATIONS / "versions").glob("*.py"):
        source = path.read_text()
        found = re.search(r'^revision\s*=\s*["\']([^"\']+)["\']', source, re.M)
        if found:
            revisions.add(found.group(1))
        parents.update(re.findall(r'^down_revision\s*=\s*["\']([^"\']+)["\']', source, re.M))
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"the governance migrations must have one head revision, found {sorted(heads)}")
    return heads.pop()


def _at_head(engine: Engine) -> bool:
    """Whether the database's `alembic_version` names the newest shipped revision (False where the
    table is missing or unreadable: the migration then decides)."""
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except Exception:  # no table yet (a new database), or one Alembic will report on properly
        return False
    return rows == [head_revision()]


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the shipped Alembic migrations up to `revision` (idempotent; Alembic is not imported
    when the database is already at the newest revision)."""
    if revision == "head" and _at_head(engine):
        return
    from alembic import command

    cfg = alembic_config()
    with _migrate_lock, engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # two servers starting at once migrate one after the other
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7215021)")
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
