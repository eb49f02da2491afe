"""The usage ledger: one row per request, written off the hot path by a batching thread.

The event loop only appends to a queue; a writer thread inserts whatever has queued up (at most
`max_batch` rows per transaction) every `interval` seconds (0.5 by default). `close()` (the
server's shutdown, after SIGTERM's drain) writes everything still queued before it returns, so
nothing the server answered is lost on a clean stop; after a `kill -9` the rows of the last
`interval` may be missing, never more than the database had not committed. Audit rows for
rejected requests and logged content take the same path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, Table, insert

from zili.governance.schema import audit_log, request_content, usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRecord:
    """One ledger row. Token counts are summed over every choice and prompt of the request."""

    request_id: str
    created_at: float  # epoch s, when the request arrived
    key_id: str | None
    key_name: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    latency_s: float
    status: str  # ok, error, aborted, rejected
    finish_reason: str | None
    cost_usd: float

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out["day"] = time.strftime("%Y-%m-%d", time.gmtime(self.created_at))
        out["request_id"] = self.request_id[:80]
        out["model"] = self.model[:256]
        return out


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


class LedgerWriter:
    """Batches inserts into the usage, audit_log and request_content tables on its own thread."""

    def __init__(self, engine: Engine, *, interval: float = 0.5, max_batch: int = 2000) -> None:
        self.engine = engine
        self.interval = interval
        self.max_batch = max_batch
        self.rows_written = 0
        self._queue: queue.SimpleQueue[tuple[Table, dict[str, Any]] | _Flush | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="zili-ledger-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def add_usage(self, record: UsageRecord) -> None:
        self._queue.put((usage, record.row()))

    def add_audit(self, row: dict[str, Any]) -> None:
        self._queue.put((audit_log, row))

    def add_content(self, row: dict[str, Any]) -> None:
        self._queue.put((request_content, row))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every row queued before this call is committed (False on timeout)."""
        if self._closed:
            return True
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Write everything queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[Any] = [item]
            deadline = time.monotonic() + self.interval
            # Gather what arrives within one interval: one transaction per batch, not per row.
            while item is not None and len(batch) < self.max_batch:
                wait = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            stop = batch[-1] is None or any(i is None for i in batch)
            rows = [i for i in batch if isinstance(i, tuple)]
            if rows:
                self._write(rows)
            for marker in batch:
                if isinstance(marker, _Flush):
                    marker.done.set()

    def _write(self, rows: list[tuple[Table, dict[str, Any]]]) -> None:
        by_table: dict[Table, list[dict[str, Any]]] = {}
        for table, row in rows:
            by_table.setdefault(table, []).append(row)
        delay = 0.1
        while True:
            try:
                with self.engine.begin() as connection:
                    for table, table_rows in by_table.items():
                        connection.execute(insert(table), table_rows)
                self.rows_written += len(rows)
                return
            except Exception:  # noqa: BLE001 - the database is down or locked: keep the rows, retry
                logger.exception("ledger: writing %d row(s) failed; retrying in %.1f s", len(rows), delay)
                if self._closed and delay > 5:
                    logger.error("ledger: giving up on %d row(s) at shutdown", len(rows))
                    return
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
