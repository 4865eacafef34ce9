"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right
HTTP status, so SDKs raise their usual exception classes and the message says what to fix."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cadenza.server.async_engine import EngineStoppedError, QueueFullError, RequestAbortedError

log = logging.getLogger("cadenza.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def conversation_not_found(conversation_id: str, param: str) -> APIError:
    """404 for a conversation that does not exist (or belongs to another tenant)."""
    return APIError(
        404,
        f"conversation {conversation_id!r} not found",
        param=param,
        code="conversation_not_found",
    )


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


# How pydantic names a union's member in an error's location: a type such as ``str``,
# ``list[int]`` or ``dict[str,any]``, or a model's class name.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z][A-Za-z0-9]*)$")


def _describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    if errors and errors[0].get("type") == "json_invalid":  # loc is (body, character offset)
        loc = errors[0].get("loc", ())
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (errors[0].get("ctx") or {}).get("error", "malformed")
        return f"request body is not valid JSON: {reason}{where}", None
    parts: list[str] = []
    param = None
    unions: dict[str, list[str]] = {}  # a union field's path: the forms it accepts
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        tag = next((i for i, p in enumerate(loc) if _UNION_MEMBER.match(p)), None)
        if tag is not None:
            # One error per member of a union: say which forms the field takes instead.
            where = ".".join(loc[:tag]) or "body"
            if where not in unions:
                unions[where] = []
                parts.append(where)
            if loc[tag] not in unions[where]:
                unions[where].append(loc[tag])
        else:
            where = ".".join(loc) or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        param = param or where
    parts = [
        f"{p}: must be one of the forms {', '.join(unions[p])}" if p in unions else p for p in parts
    ]
    more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
    return "invalid request: " + "; ".join(parts[:5]) + more, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(QueueFullError)
    async def _full(_: Request, exc: QueueFullError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return error_response(429, str(exc), code="queue_full", headers=headers)

    @app.exception_handler(EngineStoppedError)
    async def _stopped(_: Request, exc: EngineStoppedError) -> JSONResponse:
        return error_response(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(RequestAbortedError)
    async def _aborted(_: Request, exc: RequestAbortedError) -> JSONResponse:
        return error_response(503, f"{exc}; send it again", headers={"Retry-After": "1"})

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")
