"""``/v1/conversations``: OpenAI's Conversations API, each conversation backed by a session.

Items added without generating (at creation or with ``POST .../items``) are *pending*: they are
prepended to the input of the conversation's next response (``POST /v1/responses`` with
``conversation``), which then appends its input and output. Once a response has used them they
are *committed*: part of the session's exact token history and of the KV cache computed from
it. Deleting a pending item works; deleting a committed one is refused with 409 because the
history is never rewritten (create a new conversation holding the items you want instead).
While a response is in progress the conversation is locked: adding or deleting items, or
deleting the conversation, is a 409 until it finishes.

Deleting a conversation deletes its items; like OpenAI, the responses made in it stay
retrievable, and they can still be continued (``previous_response_id`` forks from them), so
the session's history is deleted only when no stored response needs it any more.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from cadenza.server import responses_format as fmt
from cadenza.server.errors import APIError, conversation_not_found
from cadenza.server.request_body import RequestBody
from cadenza.server.response_chain import release_orphan_session
from cadenza.server.response_store import (
    ConversationBusyError,
    ConversationRecord,
    ItemCommittedError,
    ResponseStore,
    new_id,
    response_store,
)
from cadenza.server.state import get_state, scoped_session, tenant_of

router = APIRouter()

_MAX_ITEMS = 20


class ConversationCreateRequest(RequestBody):
    items: list[Any] | None = Field(None, max_length=_MAX_ITEMS)
    metadata: dict[str, str] | None = None


class ConversationUpdateRequest(RequestBody):
    metadata: dict[str, str]


class ItemsCreateRequest(RequestBody):
    items: list[Any] = Field(min_length=1, max_length=_MAX_ITEMS)


def _not_found(conversation_id: str) -> APIError:
    return conversation_not_found(conversation_id, "conversation_id")


def _busy(exc: ConversationBusyError) -> APIError:
    return APIError(409, str(exc), param="conversation_id", code="conversation_locked")


def _conversation(store: ResponseStore, conversation_id: str, tenant: str) -> ConversationRecord:
    record = store.get_conversation(conversation_id, tenant)
    if record is None:
        raise _not_found(conversation_id)
    return record


@router.post("/v1/conversations")
async def create_conversation(
    body: ConversationCreateRequest, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    items = fmt.parse_items(body.items or [], param="items")
    conversation_id = new_id("conv")
    store = response_store(get_state(request))
    record = store.create_conversation(
        tenant,
        scoped_session(tenant, conversation_id),
        conversation_id,
        dict(body.metadata or {}),
        items,
    )
    return record.as_object()


@router.get("/v1/conversations/{conversation_id}")
async def retrieve_conversation(
    conversation_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    store = response_store(get_state(request))
    return _conversation(store, conversation_id, tenant).as_object()


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str,
    body: ConversationUpdateRequest,
    request: Request,
    tenant: str = Depends(tenant_of),
) -> dict[str, Any]:
    store = response_store(get_state(request))
    record = store.update_metadata(conversation_id, tenant, dict(body.metadata))
    if record is None:
        raise _not_found(conversation_id)
    return record.as_object()


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(
    conversation_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    state = get_state(request)
    store = response_store(state)
    try:
        record = store.delete_conversation(conversation_id, tenant)
    except ConversationBusyError as exc:
        raise _busy(exc) from None
    if record is None:
        raise _not_found(conversation_id)
    await release_orphan_session(state, store, record.session_id, tenant)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.post("/v1/conversations/{conversation_id}/items")
async def create_items(
    conversation_id: str,
    body: ItemsCreateRequest,
    request: Request,
    tenant: str = Depends(tenant_of),
) -> dict[str, Any]:
    items = fmt.parse_items(body.items, param="items")
    store = response_store(get_state(request))
    try:
        records = store.add_items(conversation_id, tenant, items)
    except ConversationBusyError as exc:
        raise _busy(exc) from None
    if records is None:
        raise _not_found(conversation_id)
    return fmt.item_list([record.item for record in records], False)


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(
    conversation_id: str,
    request: Request,
    tenant: str = Depends(tenant_of),
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: str = Query("desc", pattern="^(asc|desc)$"),
) -> dict[str, Any]:
    store = response_store(get_state(request))
    _conversation(store, conversation_id, tenant)
    try:
        records, has_more = store.list_items(conversation_id, after=after, limit=limit, order=order)
    except KeyError:
        raise APIError(
            400, f"item {after!r} is not in conversation {conversation_id!r}", param="after"
        ) from None
    return fmt.item_list([record.item for record in records], has_more)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def retrieve_item(
    conversation_id: str, item_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    store = response_store(get_state(request))
    _conversation(store, conversation_id, tenant)
    record = store.get_item(conversation_id, item_id)
    if record is None:
        raise APIError(404, f"item {item_id!r} not found", param="item_id", code="item_not_found")
    return record.item


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(
    conversation_id: str, item_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    """Delete a pending item; returns the conversation (as OpenAI does)."""
    store = response_store(get_state(request))
    record = _conversation(store, conversation_id, tenant)
    try:
        deleted = store.delete_item(conversation_id, tenant, item_id)
    except ConversationBusyError as exc:
        raise _busy(exc) from None
    except ItemCommittedError as exc:
        raise APIError(409, str(exc), param="item_id", code="item_in_history") from None
    if not deleted:
        raise APIError(404, f"item {item_id!r} not found", param="item_id", code="item_not_found")
    return record.as_object()
