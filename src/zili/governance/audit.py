"""The audit log: an append-only record of admin actions and rejected requests."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from zili.governance.schema import audit_log


@dataclass(frozen=True)
class AuditEvent:
    """One audit row. `detail` is a small JSON-able dict (never request or response bodies)."""

    actor: str
    action: str
    target: str | None = None
    detail: dict[str, Any] | None = None
    remote_addr: str | None = None
    created_at: float | None = None

    def row(self) -> dict[str, Any]:
        return {"created_at": self.created_at if self.created_at is not None else time.time(),
                "actor": self.actor[:80], "action": self.action[:64],
                "target": None if self.target is None else self.target[:128],
                "detail": None if self.detail is None else json.dumps(self.detail, ensure_ascii=False,
                                                                      default=str)[:8000],
                "remote_addr": None if self.remote_addr is None else self.remote_addr[:64]}


def write_audit(connection: Connection, event: AuditEvent) -> None:
    """Append `event` inside the caller's transaction (so an admin change and its record commit together)."""
    connection.execute(insert(audit_log), [event.row()])


def read_audit(engine: Engine, *, since: float | None = None, action: str | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
    """Newest first: at most `limit` rows at or after `since` (epoch s), optionally of one action."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(audit_log.c.created_at >= since)
    if action is not None:
        query = query.where(audit_log.c.action == action)
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [{**row, "detail": json.loads(row["detail"]) if row["detail"] else None} for row in rows]
