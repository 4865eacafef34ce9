"""What a session id may be, for the server and the offline API alike.

A session is addressed later as ``/v1/sessions/{id}`` (and a store is shared by both), so an
id that could not appear in that path is refused where a turn first names it.
"""

from __future__ import annotations

MAX_SESSION_ID_CHARS = 256  # the X-Session-Id header, the session_id field, LLM.chat


def session_id_problem(session_id: object) -> str | None:
    """Why ``session_id`` cannot name a session (a message that says what to fix), or None."""
    if not isinstance(session_id, str):
        return f"a session id is a string; got {type(session_id).__name__}"
    if not 1 <= len(session_id) <= MAX_SESSION_ID_CHARS:
        return f"a session id has 1 to {MAX_SESSION_ID_CHARS} characters; got {len(session_id)}"
    if "/" in session_id or any(ord(c) < 32 or ord(c) == 127 for c in session_id):
        return (
            "a session id may not contain '/' or control characters: it is addressed as"
            " /v1/sessions/{id}"
        )
    return None
