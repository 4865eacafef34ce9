"""Refuse request bodies whose text is not valid Unicode, before any route sees them.

JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); Python decodes it into a ``str`` that
cannot be encoded as UTF-8, so the tokenizer fails with a TypeError (a 500) and the SQLite
store keeps a value that later breaks listing. One check of the parsed body of every JSON
request, in front of the app, covers every route (chat, completions, responses,
conversations, and those added later) and runs before anything is stored or queued.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cadenza.server.errors import error_response

_METHODS_WITH_BODY = ("POST", "PUT", "PATCH")


def _is_valid(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def find_invalid_text(value: Any, path: str = "") -> str | None:
    """The path (``messages[0].content``) of the first string or object key in a parsed JSON
    value that is not valid Unicode, or None. A bad key is named by its escaped form."""
    if isinstance(value, str):
        return None if _is_valid(value) else (path or "body")
    if isinstance(value, dict):
        for key, item in value.items():
            if not _is_valid(key):
                return _child(path, key.encode("utf-8", "backslashreplace").decode("ascii"))
            found = find_invalid_text(item, _child(path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_invalid_text(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _is_json(headers: Headers) -> bool:
    # FastAPI parses a body without a Content-Type as JSON too.
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return not kind or kind == "application/json" or kind.endswith("+json")


class RejectInvalidText:
    """400 for a JSON request body holding text that is not valid Unicode. Pure ASGI (like
    ``BodySizeLimit``, which runs first and bounds what this reads): the body is read once,
    checked, and replayed to the app. A body that is not JSON at all is passed on, so the
    usual validation error reports it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _METHODS_WITH_BODY
            or not _is_json(Headers(scope=scope))
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before it finished sending
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        where = _where_invalid(body)
        if where is not None:
            text = (
                f"{where} is not valid Unicode: it holds a lone UTF-16 surrogate "
                "(such as \\ud800 without its pair); send valid Unicode text"
            )
            reply = error_response(400, text, param=where, code="invalid_unicode")
            await reply(scope, receive, send)
            return
        await self.app(scope, replay_body(body, receive), send)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app a body already read, whole, then defers to the real
    one (which reports the disconnect, when it comes)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _where_invalid(body: bytes) -> str | None:
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:  # not JSON (or not UTF-8): FastAPI's own parsing reports it
        return None
    return find_invalid_text(parsed)
