"""Continuum's tool-call retention: a session turn that ends in tool calls keeps its KV pinned
for as long as those tools are learned to take (``session/tool_ttl.py``), sent to the engine
(or the cluster router) as a hint with that TTL — the same pin a client's hint would set. A tool
learned to take minutes gets no pin: its session's KV goes down a tier like any idle one's.

Turns without a session (the client resends the history) are not pinned: there is no session
to pin, and the prefix cache keeps what it can.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cadenza.engine_api import HintSession
from cadenza.server.state import ServerState
from cadenza.tools.parsers import ToolCall

log = logging.getLogger("cadenza.server")


async def retain_through_tool_calls(
    state: ServerState, tenant: str, session_id: str | None, calls: Sequence[ToolCall]
) -> float:
    """Pin ``session_id``'s KV through the tool calls its turn just made; returns the TTL."""
    if session_id is None or not calls:
        return 0.0
    sessions = state.sessions
    ttl = sessions.tool_called(session_id, tenant, [call.name for call in calls])
    if ttl <= 0:
        return 0.0
    try:
        await state.engine.call(
            HintSession(session_id, tuple(sessions.history(session_id)), tenant or None, ttl_s=ttl)
        )
    except Exception:  # a pin is an optimisation: the turn itself has already succeeded
        log.exception("pinning session %s through its tool call failed", session_id)
        return 0.0
    return ttl
