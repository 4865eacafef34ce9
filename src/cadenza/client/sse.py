"""Server-sent events of the OpenAI streaming API, one ``data:`` line at a time."""

from __future__ import annotations

import json
from typing import Any

DONE = "[DONE]"


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """The JSON payload of one SSE line, :data:`DONE` for the end marker, ``None`` otherwise.

    Comments (``: ...``), ``event:``/``id:`` fields and blank separator lines give ``None``; a
    ``data:`` line whose payload is not JSON raises ``ValueError``.
    """
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload:
        return None
    if payload == DONE:
        return DONE
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad SSE payload: {payload[:200]!r}") from exc
    if not isinstance(event, dict):
        raise ValueError(f"SSE payload is not an object: {payload[:200]!r}")
    return event


def delta_text(event: dict[str, Any]) -> str:
    """The text of a ``chat.completion.chunk`` (``""`` for role, finish and usage chunks)."""
    text = ""
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if isinstance(content, str):
            text += content
    return text


def error_message(body: bytes | str) -> str:
    """The ``error.message`` of an OpenAI error body, else the body itself (shortened)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:300]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
    return text.strip()[:300]
