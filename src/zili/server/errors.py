"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# The `type` OpenAI uses for each status; anything else 4xx is an invalid request.
_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to return to the client as-is."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.headers = headers


def _default_type(status: int) -> str:
    if status >= 500:
        return _TYPES.get(status, "internal_error")
    return _TYPES.get(status, "invalid_request_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object. Client text echoed in it may hold lone surrogates (a JSON "\\ud800"),
    which UTF-8 cannot encode: they are written as visible \\uXXXX escapes, so the error itself never
    fails to render."""
    return {"error": {"message": escape_unencodable(message), "type": type,
                      "param": None if param is None else escape_unencodable(param),
                      "code": None if code is None else escape_unencodable(code)}}


def escape_unencodable(text: str) -> str:
    """`text` with every character UTF-8 cannot encode (lone surrogates) as a \\uXXXX escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quote(text: str, limit: int = 200) -> str:
    """A client string as an error message quotes it: JSON-quoted (control characters, quotes and lone
    surrogates escaped), cut to `limit` characters so a huge value does not make a huge error."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return escape_unencodable(json.dumps(cut, ensure_ascii=False))


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON: {reason}".rstrip(": "), code="invalid_json")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    messages = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        messages.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    # A 400, as OpenAI's API and vLLM answer a wrong type or a missing field (FastAPI's default is 422).
    kind = str(first.get("type", ""))
    code = ("missing_required_parameter" if kind == "missing" else
            "invalid_type" if kind.endswith(("_type", "_parsing")) or kind in ("model_attributes_type", "literal_error")
            else "invalid_value")
    return APIError(400, "Invalid request: " + "; ".join(messages) + more, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        message = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path} does not exist"
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}"))
