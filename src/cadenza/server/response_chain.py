"""Chains of responses as conversation-store sessions.

Every chain lives in a session of the conversation store, whose turns hold the exact token ids
the model saw, so a continuation's prompt is the stored history plus the template delta of the
new input and its KV is reused wherever it lives (device, host or disk tier).

* Continuing the *head* of a chain (the response whose turn is the session's latest complete
  turn) is the session's next turn.
* Continuing an older response is a *fork*: a new session gets a copy of the first ``depth``
  turns (exact token ids, no re-tokenising) and the new turn runs there. The copied history
  hashes to the same content-addressed KV blocks, so the fork still hits the cached prefix.
* A response made in a conversation is always forked from, so a ``previous_response_id``
  never appends to a conversation behind its back.

Forks copy turns through the store's public API (one transaction per turn): a fork that fails
half-way is deleted, and one orphaned by a crash is an unreferenced session, never a wrong
history.
"""

from __future__ import annotations

from typing import Any

from cadenza.engine_api import EndSession
from cadenza.server.errors import APIError
from cadenza.server.response_store import ResponseStore, StoredResponse, new_id
from cadenza.server.state import ServerState, scoped_session
from cadenza.session.store import ConversationStore


def new_chain_session(tenant: str) -> tuple[str, str]:
    """A fresh chain session: (the client-visible id, the store's scoped id)."""
    public = new_id("chain")
    return public, scoped_session(tenant, public)


def public_session_id(tenant: str, session_id: str) -> str:
    prefix = f"{tenant}:" if tenant else ""
    return session_id[len(prefix) :] if prefix and session_id.startswith(prefix) else session_id


def _history_gone(response_id: str) -> APIError:
    return APIError(
        404,
        f"the token history of response {response_id!r} has been deleted, so it cannot be"
        " continued",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def history_upto(
    store: ConversationStore, session_id: str, depth: int, response_id: str
) -> tuple[list[int], list[dict[str, Any]]]:
    """The exact token ids and the transcript of the session's first ``depth`` turns."""
    turns = store.turns(session_id)
    if len(turns) < depth:
        raise _history_gone(response_id)
    tokens: list[int] = []
    messages: list[dict[str, Any]] = []
    for turn in turns[:depth]:
        tokens += turn.input_token_ids + turn.output_token_ids
        messages += turn.input_messages + [{"role": "assistant", "content": turn.output_text}]
    return tokens, messages


def fork_session(
    store: ConversationStore, source: str, depth: int, target: str, tenant: str, response_id: str
) -> None:
    """Create ``target`` holding a copy of the first ``depth`` complete turns of ``source``."""
    turns = store.turns(source)
    if len(turns) < depth:
        raise _history_gone(response_id)
    store.create_session(
        target, tenant=tenant, metadata={"forked_from": response_id, "api": "responses"}
    )
    try:
        for turn in turns[:depth]:
            index = store.begin_turn(
                target, turn.request_id, turn.input_token_ids, turn.input_messages
            )
            store.complete_turn(
                target, index, turn.output_token_ids, turn.output_text, turn.finish_reason
            )
    except BaseException:
        store.delete_session(target)
        raise


def continue_from(
    store: ConversationStore, previous: StoredResponse, tenant: str
) -> tuple[str, bool]:
    """The session a response continuing ``previous`` runs in, and whether it is a new fork."""
    source = previous.session_id
    record = store.get_session(source, tenant=tenant) if source else None
    if record is None or source is None:
        raise _history_gone(previous.response_id)
    if previous.conversation_id is None and record.num_turns == previous.depth:
        return source, False
    _, target = new_chain_session(tenant)
    fork_session(store, source, previous.depth, target, tenant, previous.response_id)
    return target, True


def with_instructions(
    messages: list[dict[str, Any]], instructions: str | None, in_effect: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Prepend ``instructions`` as a system message unless they are already the ones in
    effect in the history; returns the messages and the instructions in effect after them."""
    if instructions is None or instructions == in_effect:
        return messages, in_effect
    return [{"role": "system", "content": instructions}, *messages], instructions


async def release_orphan_session(
    state: ServerState, store: ResponseStore, session_id: str, tenant: str
) -> None:
    """Delete a chain's session once nothing refers to it any more (no stored response or
    conversation, no response being finalised, no turn in flight): its KV and history go."""

    sessions = state.sessions
    if store.session_in_use(session_id) or sessions.store.pending_turn(session_id):
        return
    history = tuple(sessions.history(session_id))
    sessions.store.delete_session(session_id, tenant=tenant)
    await state.engine.call(EndSession(session_id, history, tenant or None))
