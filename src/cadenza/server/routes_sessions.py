"""Session extensions: the SYMPHONY advisory hint, session end, and a session's transcript."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from cadenza.engine_api import EndSession, HintSession
from cadenza.server.errors import APIError
from cadenza.server.protocol import HintRequest
from cadenza.server.state import ServerState, get_state, scoped_session, tenant_of
from cadenza.session.ids import session_id_problem
from cadenza.session.store import SessionRecord, TenantMismatchError

router = APIRouter()


def _not_found(session_id: str) -> APIError:
    return APIError(404, f"session {session_id!r} does not exist", param="session_id")


def _owned(state: ServerState, tenant: str, session_id: str) -> SessionRecord:
    """The caller's session record; 404 if there is none (400 for an id no session has)."""
    problem = session_id_problem(session_id)
    if problem is not None:
        raise APIError(400, problem, param="session_id")
    sid = scoped_session(tenant, session_id)
    try:
        record = state.sessions.store.get_session(sid, tenant=tenant)
    except TenantMismatchError:
        record = None
    if record is None:
        raise _not_found(session_id)
    return record


@router.post("/v1/sessions/{session_id}/hint")
async def hint_session(
    session_id: str, body: HintRequest, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    """The session's next turn is coming (in ``expected_arrival_s``): move its KV towards the
    device now and keep it there (pinned, softly) until then, or for ``ttl_s``."""

    state = get_state(request)
    sid = _owned(state, tenant, session_id).session_id
    result = await state.engine.call(
        HintSession(
            sid,
            tuple(state.sessions.history(sid)),
            cache_salt=tenant or None,
            expected_arrival_s=body.expected_arrival_s,
            ttl_s=body.ttl_s,
        )
    )
    return {
        "session_id": session_id,
        "object": "session.hint",
        "blocks_by_tier": result.blocks_by_tier,
    }


@router.delete("/v1/sessions/{session_id}")
async def end_session(
    session_id: str, request: Request, tenant: str = Depends(tenant_of), purge: bool = False
) -> dict[str, Any]:
    """The session is over: its KV is unpinned and becomes ordinary evictable cache. With
    ``?purge=true`` its stored history is deleted too."""

    state = get_state(request)
    record = _owned(state, tenant, session_id)
    sid = record.session_id
    if purge and record.metadata.get("api", "chat") != "chat":
        raise APIError(
            409,
            f"session {session_id!r} holds a Responses chain or conversation; delete those"
            " through their own API",
            param="session_id",
            code="session_in_use",
        )
    if purge:
        _refuse_purge_mid_turn(state, session_id, sid)
    await state.engine.call(EndSession(sid, tuple(state.sessions.history(sid)), tenant or None))
    if purge:
        _refuse_purge_mid_turn(state, session_id, sid)  # a turn may have begun meanwhile
        state.sessions.store.delete_session(sid, tenant=tenant)
    return {
        "id": session_id,
        "object": "session.deleted" if purge else "session.ended",
        "deleted": purge,
    }


def _refuse_purge_mid_turn(state: ServerState, session_id: str, sid: str) -> None:
    """Deleting the history of a turn in flight would leave it nowhere to land: 409, as for
    two turns at once."""
    if state.sessions.store.pending_turn(sid):
        raise APIError(
            409,
            f"session {session_id!r} has a turn in progress; purge it once the turn is done"
            " (or end it without purge now)",
            param="session_id",
            code="session_busy",
        )


@router.get("/v1/sessions/{session_id}")
async def get_session(
    session_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    state = get_state(request)
    record = _owned(state, tenant, session_id)
    sid = record.session_id
    return {
        "id": session_id,
        "object": "session",
        "created_at": int(record.created_at),
        "num_turns": record.num_turns,
        "num_tokens": record.num_tokens,
        "messages": state.sessions.store.messages(sid),
    }
