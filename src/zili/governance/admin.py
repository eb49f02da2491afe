"""The admin HTTP API under /admin/v1: keys, usage, audit, pause and resume.

Guarded by the admin key given to `zili serve --admin-key` (or ZILI_ADMIN_KEY): without a key
401, with a user's key 403, and 403 for everyone when the server has no admin key. Every change
is written to the audit log with the caller's address.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from zili.governance.audit import AuditEvent, read_audit
from zili.governance.keys import MAX_LIMIT, KeyNotFoundError, iso, parse_time
from zili.governance.reports import GROUPS, usage_report
from zili.governance.service import Governance
from zili.server.auth import _bearer
from zili.server.errors import APIError, bad_request
from zili.server.protocol import ErrorResponse

# PostgreSQL text cannot hold NUL, and its driver's error is no ValueError (it was a 500 there):
# every client string that reaches the database is refused with a 400 when it holds one.
NO_NUL = r"^[^\x00]*$"
Limit = Annotated[int | None, Field(ge=1, le=MAX_LIMIT)]
ModelList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256, pattern=NO_NUL)]] | None,
                      Field(min_length=1, max_length=64)]
KeyRef = Annotated[str, Path(pattern=NO_NUL)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
    models: ModelList = None
    rpm: Limit = None
    tpm: Limit = None
    tokens_per_day: Limit = None
    max_concurrency: Limit = None
    expires: str | None = Field(None, max_length=64, pattern=NO_NUL,
                                description="A duration from now (30d, 12h) or an ISO 8601 time.")


class KeyUpdate(BaseModel):
    """Fields to change; an explicit null removes that limit (or the model list, or the expiry)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    models: ModelList = None
    rpm: Limit = None
    tpm: Limit = None
    tokens_per_day: Limit = None
    max_concurrency: Limit = None
    expires: str | None = Field(None, max_length=64, pattern=NO_NUL)


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    message: str = Field(default="The service is paused by its operator.", min_length=1, max_length=500,
                         pattern=NO_NUL)
    abort: bool = False


def _governance(request: Request) -> Governance:
    return request.app.state.zili.governance


def _client(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


async def require_admin(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
    gov = _governance(request)
    admin_key = gov.config.admin_key
    if not admin_key:
        raise APIError(403, "The admin API is off: start the server with --admin-key (or ZILI_ADMIN_KEY).",
                       type="permission_error", code="admin_disabled")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "Missing admin key: send it as 'Authorization: Bearer <admin key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    token = credentials.credentials
    if hmac.compare_digest(token.encode("utf-8", "surrogatepass"), admin_key.encode("utf-8", "surrogatepass")):
        return
    if gov.is_user_key(token) or await gov.lookup(token) is not None:
        raise APIError(403, "This is a user key; the admin API needs the admin key.", type="permission_error",
                       code="not_admin")
    raise APIError(401, "Incorrect admin key provided.", code="invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404)}
admin_router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)], responses=_ERRORS,
                         tags=["admin"])


def _value_error(exc: ValueError) -> APIError:
    text = str(exc)
    field, sep, _ = text.partition(":")
    return bad_request(text, param=field if sep and " " not in field else None)


def _not_found(exc: KeyNotFoundError) -> APIError:
    return APIError(404, str(exc).capitalize(), param="key", code="key_not_found")


@admin_router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request) -> JSONResponse:
    """Create a key; the response holds its secret (`key`), shown this once."""
    gov = _governance(request)
    try:
        expires_at = parse_time(body.expires, "expires") if body.expires is not None else None
        key, secret = await asyncio.to_thread(
            gov.keys.create, body.name, models=body.models, rpm=body.rpm, tpm=body.tpm,
            tokens_per_day=body.tokens_per_day, max_concurrency=body.max_concurrency, expires_at=expires_at,
            actor="admin", remote_addr=_client(request))
    except ValueError as exc:
        raise _value_error(exc) from None
    gov.key_changed(key)
    return JSONResponse({**key.public(), "key": secret}, status_code=201)


@admin_router.get("/keys")
async def list_keys(request: Request, include_revoked: bool = False) -> dict[str, Any]:
    gov = _governance(request)
    keys = await asyncio.to_thread(gov.keys.list, include_revoked)
    return {"object": "list", "data": [_with_load(gov, k.public()) for k in keys]}


@admin_router.get("/keys/{name_or_id}")
async def get_key(name_or_id: KeyRef, request: Request) -> dict[str, Any]:
    gov = _governance(request)
    try:
        key = await asyncio.to_thread(gov.keys.get, name_or_id)
    except KeyNotFoundError as exc:
        raise _not_found(exc) from None
    return _with_load(gov, key.public())


@admin_router.patch("/keys/{name_or_id}")
async def update_key(name_or_id: KeyRef, body: KeyUpdate, request: Request) -> dict[str, Any]:
    """Change limits, models or expiry; fields left out stay as they are, null removes a limit."""
    gov = _governance(request)
    changes: dict[str, Any] = {f: getattr(body, f) for f in body.model_fields_set if f != "expires"}
    if not body.model_fields_set:
        raise bad_request("give at least one field to change", param="body")
    try:
        if "expires" in body.model_fields_set:
            changes["expires_at"] = parse_time(body.expires, "expires") if body.expires is not None else None
        key = await asyncio.to_thread(gov.keys.update, name_or_id, changes, actor="admin",
                                      remote_addr=_client(request))
    except KeyNotFoundError as exc:
        raise _not_found(exc) from None
    except ValueError as exc:
        raise _value_error(exc) from None
    gov.key_changed(key)
    return key.public()


@admin_router.delete("/keys/{name_or_id}")
async def revoke_key(name_or_id: KeyRef, request: Request) -> dict[str, Any]:
    """Revoke a key: its next request gets 401 and its requests in flight are aborted now."""
    gov = _governance(request)
    try:
        key = await asyncio.to_thread(gov.keys.revoke, name_or_id, actor="admin", remote_addr=_client(request))
    except KeyNotFoundError as exc:
        raise _not_found(exc) from None
    aborted = gov.abort_key(key.id)
    gov.key_changed(key)
    return {**key.public(), "aborted_requests": aborted}


@admin_router.get("/usage")
async def usage(request: Request, by: Annotated[Literal["day", "model", "key"], Query()] = "day",
                since: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
                key: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
                model: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None) -> dict[str, Any]:
    """Ledger totals grouped by UTC day, model or key; `since` is a duration back (7d) or an ISO time."""
    gov = _governance(request)
    try:
        since_t = parse_time(since, "since", future=False) if since is not None else None
        key_id = (await asyncio.to_thread(gov.keys.get, key)).id if key is not None else None
    except KeyNotFoundError as exc:
        raise _not_found(exc) from None
    except ValueError as exc:
        raise _value_error(exc) from None
    if gov.ledger is not None:
        await asyncio.to_thread(gov.ledger.flush)  # the report includes every request answered so far
    rows = await asyncio.to_thread(usage_report, gov.db, by=by, since=since_t, key_id=key_id, model=model)
    return {"object": "list", "by": by, "since": iso(since_t), "data": rows, "groups": list(GROUPS)}


@admin_router.get("/audit")
async def audit(request: Request, since: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
                action: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
                limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
    """The audit log, newest first."""
    gov = _governance(request)
    try:
        since_t = parse_time(since, "since", future=False) if since is not None else None
    except ValueError as exc:
        raise _value_error(exc) from None
    if gov.ledger is not None:
        await asyncio.to_thread(gov.ledger.flush)
    rows = await asyncio.to_thread(read_audit, gov.db, since=since_t, action=action, limit=limit)
    return {"object": "list", "data": [{**r, "created_at": iso(r["created_at"])} for r in rows]}


@admin_router.post("/pause")
async def pause(request: Request, body: PauseRequest | None = None) -> dict[str, Any]:
    """Stop admitting requests (503 with `message`); with `abort`, also abort every running request."""
    gov = _governance(request)
    body = body or PauseRequest()
    running = _running(request)
    gov.pause(body.message, body.abort)
    await asyncio.to_thread(gov.audit_admin, AuditEvent("admin", "pause", None,
                                                        {"message": body.message, "abort": body.abort,
                                                         "running": running}, _client(request)))
    return {"paused": True, "message": body.message, "aborted": running if body.abort else 0}


@admin_router.post("/resume")
async def resume(request: Request) -> dict[str, Any]:
    gov = _governance(request)
    was = gov.paused is not None
    gov.resume()
    await asyncio.to_thread(gov.audit_admin, AuditEvent("admin", "resume", None, {"was_paused": was},
                                                        _client(request)))
    return {"paused": False}


def _running(request: Request) -> int:
    stats = request.app.state.zili.engine.stats()
    return (stats.num_running + stats.num_waiting) if stats is not None else 0


def _with_load(gov: Governance, key: dict[str, Any]) -> dict[str, Any]:
    return {**key, "in_flight": gov.quotas.in_flight(key["id"])}
