"""Usage reports from the ledger: totals grouped by UTC day, model or key."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, case, func, select

from zili.governance.schema import usage

GROUPS = {"day": usage.c.day, "model": usage.c.model, "key": func.coalesce(usage.c.key_name, "(static key)")}


def usage_report(engine: Engine, *, by: str = "day", since: float | None = None, key_id: str | None = None,
                 model: str | None = None) -> list[dict[str, Any]]:
    """One dict per group: requests, by status, token sums and cost in dollars, ordered by group.

    `since`: epoch seconds (rows from then on); `key_id`: one key's rows. Raises ValueError for an
    unknown `by`.
    """
    if by not in GROUPS:
        raise ValueError(f"by: one of {', '.join(GROUPS)}, got {by[:32]!r}")
    group = GROUPS[by].label(by)
    counted = {status: func.sum(case((usage.c.status == status, 1), else_=0)).label(status)
               for status in ("ok", "error", "aborted", "rejected")}
    query = (select(group, func.count().label("requests"), *counted.values(),
                    func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
                    func.sum(usage.c.cached_tokens).label("cached_tokens"),
                    func.sum(usage.c.completion_tokens).label("completion_tokens"),
                    func.sum(usage.c.reasoning_tokens).label("reasoning_tokens"),
                    func.sum(usage.c.cost_usd).label("cost_usd"))
             .group_by(group).order_by(group))
    if since is not None:
        query = query.where(usage.c.created_at >= since)
    if key_id is not None:
        query = query.where(usage.c.key_id == key_id)
    if model is not None:
        query = query.where(usage.c.model == model)
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    out = []
    for row in rows:
        item = {k: (int(v) if k not in (by, "cost_usd") and v is not None else v) for k, v in row.items()}
        item["total_tokens"] = item["prompt_tokens"] + item["completion_tokens"]
        item["cost_usd"] = float(item["cost_usd"] or 0.0)
        out.append(item)
    return out


def tokens_used_on(engine: Engine, key_id: str, day: str) -> int:
    """Prompt + completion tokens the ledger holds for `key_id` on UTC `day` ('YYYY-MM-DD')."""
    query = (select(func.coalesce(func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), 0))
             .where(usage.c.key_id == key_id, usage.c.day == day))
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())
