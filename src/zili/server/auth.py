"""API keys: `Authorization: Bearer <key>` on /v1/*, /tokenize and /detokenize.

Static keys (--api-key, --api-key-file, ZILI_API_KEY) are compared in constant time. When the
server governs its keys (zili.governance: keys in a database, quotas, a ledger), a request needs
a database key or a static one, and the governance layer decides.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from zili.server.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="One of the keys given with --api-key / --api-key-file.")


def read_api_keys(keys: list[str] | None, key_file: Path | None) -> list[str]:
    """Keys from the command line plus one per non-blank, non-# line of the file."""
    out = [k.strip() for k in keys or [] if k.strip()]
    if key_file is not None:
        for line in Path(key_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def key_matches(given: str, keys: list[str]) -> bool:
    # compare_digest against every key: no early exit that would time which key is close.
    given_bytes = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode())
    return matched


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> None:
    state = request.app.state.zili
    if state.governance is not None:
        token = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
        client = request.client.host if request.client is not None else None
        await state.governance.authenticate(token, request.url.path, client)
        return
    keys: list[str] = state.settings.api_keys
    if not keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not key_matches(credentials.credentials, keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
