"""Session extensions: the SYMPHONY advisory hint, session end, and a session's transcript."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from cadenza.engine import LLMEngine
from cadenza.server.errors import APIError
from cadenza.server.protocol import HintRequest
from cadenza.server.state import get_state, scoped_session, tenant_of
from cadenza.session.store import TenantMismatchError

router = APIRouter()


def _not_found(session_id: str) -> APIError:
    return APIError(404, f"session {session_id!r} does not exist", param="session_id")


@router.post("/v1/sessions/{session_id}/hint")
async def hint_session(
    session_id: str, body: HintRequest, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    """The session's next turn is coming (in ``expected_arrival_s``): move its KV towards the
    device now and keep it there (pinned, softly) until then, or for ``ttl_s``."""

    def run(engine: LLMEngine) -> dict[str, int]:
        sid = scoped_session(tenant, session_id)
        return engine.hint(sid, body.expected_arrival_s, tenant=tenant, ttl_s=body.ttl_s)

    try:
        found = await get_state(request).engine.call(run)
    except (KeyError, TenantMismatchError):
        raise _not_found(session_id) from None
    return {"session_id": session_id, "object": "session.hint", "blocks_by_tier": found}


@router.delete("/v1/sessions/{session_id}")
async def end_session(
    session_id: str, request: Request, tenant: str = Depends(tenant_of), purge: bool = False
) -> dict[str, Any]:
    """The session is over: its KV is unpinned and becomes ordinary evictable cache. With
    ``?purge=true`` its stored history is deleted too."""

    def run(engine: LLMEngine) -> bool:
        sid = scoped_session(tenant, session_id)
        return engine.end_session(sid, tenant=tenant, delete=purge)

    try:
        ended = await get_state(request).engine.call(run)
    except TenantMismatchError:
        ended = False
    if not ended:
        raise _not_found(session_id)
    return {
        "id": session_id,
        "object": "session.deleted" if purge else "session.ended",
        "deleted": purge,
    }


@router.get("/v1/sessions/{session_id}")
async def get_session(
    session_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    def run(engine: LLMEngine) -> dict[str, Any] | None:
        sid = scoped_session(tenant, session_id)
        record = engine.store.get_session(sid, tenant=tenant)
        if record is None:
            return None
        return {
            "id": session_id,
            "object": "session",
            "created_at": int(record.created_at),
            "num_turns": record.num_turns,
            "num_tokens": record.num_tokens,
            "messages": engine.store.messages(sid),
        }

    try:
        found = await get_state(request).engine.call(run)
    except TenantMismatchError:
        found = None
    if found is None:
        raise _not_found(session_id)
    return found
