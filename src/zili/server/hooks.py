"""The seam where request governance (zili.governance) plugs into serving.

ServerState.request_hooks is None on a plain server; when set, every Generation calls it at
admission, on each batch of output deltas, and once when the request ends, whatever the ending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from zili.server.generation import ChoiceDelta, Generation

RequestStatus = Literal["ok", "error", "aborted", "rejected"]


class RequestHooks(Protocol):
    async def admit(self, gen: Generation) -> None:
        """Before the engine sees `gen`: raise an APIError (429, 403, 503, 400) to refuse it."""

    def on_deltas(self, gen: Generation, deltas: list[ChoiceDelta]) -> list[ChoiceDelta]:
        """What the client is about to get; may end choices (finish_reason "content_filter")."""

    def finished(self, gen: Generation, status: RequestStatus) -> None:
        """Once per admitted request, when it ends: ok, error, aborted, or rejected by the engine."""
