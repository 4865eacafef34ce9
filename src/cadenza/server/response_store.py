"""Durable state of the Responses and Conversations APIs: stored response objects,
conversations and their items, in SQLite next to the conversation store.

The tables live in the same file as the engine's conversation store (``session_store_path``;
``None`` or ``":memory:"`` keeps them in memory) through a connection of their own, so one file
holds everything a restarted server needs: the exact token history of every chain (the
conversation store's sessions and turns) and the objects the API hands back (here).

What links the two is ``(session_id, depth)`` on every stored response: the store session that
holds its history, and how many complete turns that session had once the response finished.
A response is the *head* of its session while ``num_turns == depth``; continuing the head is
the session's next turn, continuing anything else is a fork (see ``response_chain``). Because
the check reads the conversation store itself, a response whose turn completed but whose object
was never saved (a crash in between) cannot make a later continuation skip or repeat a turn.

A conversation is backed by one store session. Items appended without generating are *pending*:
they are not in the token history yet and are prepended to the next response's input. The
response that takes them *claims* them (and marks the conversation busy, so a second response
or an item write meanwhile is refused with 409); when it completes, the claimed items, its input
and its output are *committed* in one transaction. Claims are cleared at start-up: a server that
died mid-response left the turn ``interrupted`` in the conversation store, so the items are
still pending. (A crash in the instant between the turn completing and the commit leaves them
pending although the history holds them; the next response then repeats them once.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cadenza.server.state import ServerState
from cadenza.session.sqlite_db import SqliteDatabase

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS api_responses (
        response_id     TEXT PRIMARY KEY,
        tenant          TEXT NOT NULL,
        created_at      REAL NOT NULL,
        session_id      TEXT,
        depth           INTEGER NOT NULL,
        conversation_id TEXT,
        instructions    TEXT,
        body            TEXT NOT NULL,
        input_items     TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS api_responses_by_session ON api_responses(session_id)",
    """
    CREATE TABLE IF NOT EXISTS api_conversations (
        conversation_id TEXT PRIMARY KEY,
        tenant          TEXT NOT NULL,
        created_at      REAL NOT NULL,
        session_id      TEXT NOT NULL,
        metadata        TEXT NOT NULL DEFAULT '{}',
        instructions    TEXT,
        active_request  TEXT
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS api_conversation_items (
        conversation_id TEXT NOT NULL,
        seq             INTEGER NOT NULL,
        item_id         TEXT NOT NULL UNIQUE,
        item            TEXT NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ('pending', 'committed')),
        claimed_by      TEXT,
        PRIMARY KEY (conversation_id, seq)
    )
    """,
)


class ConversationBusyError(RuntimeError):
    """A response is in progress on the conversation; it takes one at a time."""


class ItemCommittedError(RuntimeError):
    """The item is part of the conversation's token history and cannot be removed."""


@dataclass(frozen=True)
class StoredResponse:
    response_id: str
    tenant: str
    created_at: float
    session_id: str | None  # the conversation-store session holding its history (scoped id)
    depth: int  # complete turns in that session once this response finished
    conversation_id: str | None
    instructions: str | None  # instructions in effect in the history after this response
    body: dict[str, Any]  # the response object as returned
    input_items: list[dict[str, Any]]


@dataclass(frozen=True)
class ConversationRecord:
    conversation_id: str
    tenant: str
    created_at: float
    session_id: str  # scoped store session id
    metadata: dict[str, Any]
    instructions: str | None
    active_request: str | None

    def as_object(self) -> dict[str, Any]:
        return {
            "id": self.conversation_id,
            "object": "conversation",
            "created_at": int(self.created_at),
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class ItemRecord:
    conversation_id: str
    seq: int
    item_id: str
    item: dict[str, Any]
    state: str  # "pending" | "committed"


@dataclass(frozen=True)
class ConversationCommit:
    """What a completed response adds to its conversation."""

    conversation_id: str
    request_id: str
    items: list[dict[str, Any]]  # the response's own input items, then its output items
    instructions: str | None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseStore(SqliteDatabase):
    """Response objects and conversations; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(path or ":memory:", "response store")
        self._held: Counter[str] = Counter()
        with self._write() as c:
            for statement in _SCHEMA:
                c.execute(statement)
            # Whoever held a claim before this process started is gone.
            c.execute("UPDATE api_conversations SET active_request = NULL")
            c.execute("UPDATE api_conversation_items SET claimed_by = NULL WHERE state = 'pending'")

    # -- sessions a response is being finalised on (never garbage-collected meanwhile) --

    def hold(self, session_id: str) -> None:
        with self._lock:
            self._held[session_id] += 1

    def release_hold(self, session_id: str) -> None:
        with self._lock:
            self._held[session_id] -= 1
            if self._held[session_id] <= 0:
                del self._held[session_id]

    def session_in_use(self, session_id: str) -> bool:
        """Whether a stored response, a conversation or a response in flight needs the
        session's history (if not, the session can be deleted)."""
        with self._read() as conn:
            if self._held.get(session_id):
                return True
            for table in ("api_responses", "api_conversations"):
                row = conn.execute(
                    f"SELECT 1 FROM {table} WHERE session_id = ? LIMIT 1", (session_id,)
                ).fetchone()
                if row is not None:
                    return True
        return False

    # -- responses --

    def put_response(
        self, record: StoredResponse, commit: ConversationCommit | None = None
    ) -> None:
        """Store a finished response (and commit its conversation's items) atomically."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO api_responses (response_id, tenant, created_at, session_id, depth,"
                " conversation_id, instructions, body, input_items)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.response_id,
                    record.tenant,
                    record.created_at,
                    record.session_id,
                    record.depth,
                    record.conversation_id,
                    record.instructions,
                    json.dumps(record.body),
                    json.dumps(record.input_items),
                ),
            )
            if commit is not None:
                self._commit(conn, commit)

    def get_response(self, response_id: str, tenant: str) -> StoredResponse | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM api_responses WHERE response_id = ? AND tenant = ?",
                (response_id, tenant),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(
            response_id=row["response_id"],
            tenant=row["tenant"],
            created_at=row["created_at"],
            session_id=row["session_id"],
            depth=row["depth"],
            conversation_id=row["conversation_id"],
            instructions=row["instructions"],
            body=json.loads(row["body"]),
            input_items=json.loads(row["input_items"]),
        )

    def delete_response(self, response_id: str, tenant: str) -> str | None:
        """Delete the response; returns its session id ("" if none), None if not found."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT session_id FROM api_responses WHERE response_id = ? AND tenant = ?",
                (response_id, tenant),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM api_responses WHERE response_id = ?", (response_id,))
        return row["session_id"] or ""

    # -- conversations --

    def create_conversation(
        self,
        tenant: str,
        session_id: str,
        conversation_id: str,
        metadata: dict[str, Any],
        items: list[dict[str, Any]],
    ) -> ConversationRecord:
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO api_conversations (conversation_id, tenant, created_at, session_id,"
                " metadata) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, tenant, now, session_id, json.dumps(metadata)),
            )
            self._insert_items(conn, conversation_id, items, "pending")
        return ConversationRecord(conversation_id, tenant, now, session_id, metadata, None, None)

    def get_conversation(self, conversation_id: str, tenant: str) -> ConversationRecord | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM api_conversations WHERE conversation_id = ? AND tenant = ?",
                (conversation_id, tenant),
            ).fetchone()
        return None if row is None else _conversation(row)

    def update_metadata(
        self, conversation_id: str, tenant: str, metadata: dict[str, Any]
    ) -> ConversationRecord | None:
        """Replace the conversation's metadata (as OpenAI's update does)."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE api_conversations SET metadata = ?"
                " WHERE conversation_id = ? AND tenant = ?",
                (json.dumps(metadata), conversation_id, tenant),
            ).rowcount
        return self.get_conversation(conversation_id, tenant) if changed else None

    def delete_conversation(self, conversation_id: str, tenant: str) -> ConversationRecord | None:
        """Delete the conversation and its items (stored responses stay retrievable)."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT * FROM api_conversations WHERE conversation_id = ? AND tenant = ?",
                (conversation_id, tenant),
            ).fetchone()
            if row is None:
                return None
            if row["active_request"] is not None:
                raise ConversationBusyError(
                    f"a response is in progress in conversation {conversation_id}; delete it"
                    " once that response has finished"
                )
            conn.execute(
                "DELETE FROM api_conversation_items WHERE conversation_id = ?", (conversation_id,)
            )
            conn.execute(
                "DELETE FROM api_conversations WHERE conversation_id = ?", (conversation_id,)
            )
        return _conversation(row)

    # -- items --

    def add_items(
        self, conversation_id: str, tenant: str, items: list[dict[str, Any]]
    ) -> list[ItemRecord] | None:
        """Append pending items; None if the conversation does not exist."""
        with self._write() as conn:
            row = self._conversation_row(conn, conversation_id, tenant)
            if row is None:
                return None
            self._check_idle(row)
            return self._insert_items(conn, conversation_id, items, "pending")

    def list_items(
        self,
        conversation_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: str = "desc",
    ) -> tuple[list[ItemRecord], bool]:
        """A page of items (ordered by position) and whether more follow."""
        descending = order == "desc"
        sql = "SELECT * FROM api_conversation_items WHERE conversation_id = ?"
        params: list[Any] = [conversation_id]
        with self._read() as conn:
            if after is not None:
                anchor = conn.execute(
                    "SELECT seq FROM api_conversation_items WHERE conversation_id = ?"
                    " AND item_id = ?",
                    (conversation_id, after),
                ).fetchone()
                if anchor is None:
                    raise KeyError(after)
                sql += " AND seq < ?" if descending else " AND seq > ?"
                params.append(anchor["seq"])
            sql += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
            params.append(limit + 1)
            rows = conn.execute(sql, params).fetchall()
        items = [_item(row) for row in rows[:limit]]
        return items, len(rows) > limit

    def get_item(self, conversation_id: str, item_id: str) -> ItemRecord | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM api_conversation_items WHERE conversation_id = ? AND item_id = ?",
                (conversation_id, item_id),
            ).fetchone()
        return None if row is None else _item(row)

    def delete_item(self, conversation_id: str, tenant: str, item_id: str) -> bool:
        """Delete a pending item. Committed items are part of the token history (and of the
        KV cache built from it): ``ItemCommittedError``."""
        with self._write() as conn:
            row = self._conversation_row(conn, conversation_id, tenant)
            if row is None:
                return False
            self._check_idle(row)
            item = conn.execute(
                "SELECT state FROM api_conversation_items WHERE conversation_id = ?"
                " AND item_id = ?",
                (conversation_id, item_id),
            ).fetchone()
            if item is None:
                return False
            if item["state"] == "committed":
                raise ItemCommittedError(
                    f"item {item_id} has already been used by a response: it is part of the"
                    " conversation's token history and its KV cache, which are never"
                    " rewritten. Start a new conversation with the items you want to keep."
                )
            conn.execute(
                "DELETE FROM api_conversation_items WHERE conversation_id = ? AND item_id = ?",
                (conversation_id, item_id),
            )
        return True

    def claim_pending(
        self, conversation_id: str, tenant: str, request_id: str
    ) -> list[ItemRecord] | None:
        """Mark the conversation busy with ``request_id`` and take its pending items (in
        order). None if the conversation does not exist; ``ConversationBusyError`` if busy."""
        with self._write() as conn:
            row = self._conversation_row(conn, conversation_id, tenant)
            if row is None:
                return None
            self._check_idle(row)
            conn.execute(
                "UPDATE api_conversations SET active_request = ? WHERE conversation_id = ?",
                (request_id, conversation_id),
            )
            conn.execute(
                "UPDATE api_conversation_items SET claimed_by = ? WHERE conversation_id = ?"
                " AND state = 'pending'",
                (request_id, conversation_id),
            )
            rows = conn.execute(
                "SELECT * FROM api_conversation_items WHERE conversation_id = ?"
                " AND claimed_by = ? ORDER BY seq",
                (conversation_id, request_id),
            ).fetchall()
        return [_item(row) for row in rows]

    def pending_items(self, conversation_id: str) -> list[ItemRecord]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM api_conversation_items WHERE conversation_id = ?"
                " AND state = 'pending' ORDER BY seq",
                (conversation_id,),
            ).fetchall()
        return [_item(row) for row in rows]

    def release_claim(self, conversation_id: str, request_id: str) -> None:
        """The response failed: its claimed items are pending again, the conversation idle."""
        with self._write() as conn:
            conn.execute(
                "UPDATE api_conversation_items SET claimed_by = NULL WHERE conversation_id = ?"
                " AND claimed_by = ?",
                (conversation_id, request_id),
            )
            conn.execute(
                "UPDATE api_conversations SET active_request = NULL WHERE conversation_id = ?"
                " AND active_request = ?",
                (conversation_id, request_id),
            )

    # -- helpers --

    def _commit(self, conn: sqlite3.Connection, commit: ConversationCommit) -> None:
        cid, rid = commit.conversation_id, commit.request_id
        conn.execute(
            "UPDATE api_conversation_items SET state = 'committed', claimed_by = NULL"
            " WHERE conversation_id = ? AND claimed_by = ?",
            (cid, rid),
        )
        self._insert_items(conn, cid, commit.items, "committed")
        conn.execute(
            "UPDATE api_conversations SET active_request = NULL, instructions = ?"
            " WHERE conversation_id = ? AND active_request = ?",
            (commit.instructions, cid, rid),
        )

    @staticmethod
    def _conversation_row(
        conn: sqlite3.Connection, conversation_id: str, tenant: str
    ) -> sqlite3.Row | None:
        return conn.execute(
            "SELECT * FROM api_conversations WHERE conversation_id = ? AND tenant = ?",
            (conversation_id, tenant),
        ).fetchone()

    @staticmethod
    def _check_idle(row: sqlite3.Row) -> None:
        if row["active_request"] is not None:
            raise ConversationBusyError(
                f"response {row['active_request']} is in progress in conversation"
                f" {row['conversation_id']}; retry when it has finished"
            )

    @staticmethod
    def _insert_items(
        conn: sqlite3.Connection, conversation_id: str, items: list[dict[str, Any]], state: str
    ) -> list[ItemRecord]:
        seq = conn.execute(
            "SELECT COALESCE(MAX(seq) + 1, 0) FROM api_conversation_items"
            " WHERE conversation_id = ?",
            (conversation_id,),
        ).fetchone()[0]
        records = []
        for offset, item in enumerate(items):
            record = ItemRecord(conversation_id, seq + offset, item["id"], item, state)
            conn.execute(
                "INSERT INTO api_conversation_items (conversation_id, seq, item_id, item, state)"
                " VALUES (?, ?, ?, ?, ?)",
                (conversation_id, record.seq, record.item_id, json.dumps(item), state),
            )
            records.append(record)
        return records


def _conversation(row: sqlite3.Row) -> ConversationRecord:
    return ConversationRecord(
        conversation_id=row["conversation_id"],
        tenant=row["tenant"],
        created_at=row["created_at"],
        session_id=row["session_id"],
        metadata=json.loads(row["metadata"]),
        instructions=row["instructions"],
        active_request=row["active_request"],
    )


def _item(row: sqlite3.Row) -> ItemRecord:
    return ItemRecord(
        conversation_id=row["conversation_id"],
        seq=row["seq"],
        item_id=row["item_id"],
        item=json.loads(row["item"]),
        state=row["state"],
    )


_OPEN_LOCK = threading.Lock()
_KEY = "response_store"


def response_store(state: ServerState) -> ResponseStore:
    """The server's response store, opened on first use on the engine's store file."""
    store = state.extras.get(_KEY)
    if store is not None:
        return store
    with _OPEN_LOCK:
        store = state.extras.get(_KEY)
        if store is None:
            path = state.engine.config.session_store_path
            store = ResponseStore(path)
            state.extras[_KEY] = store
    return store


def close_response_store(state: ServerState) -> None:
    store = state.extras.pop(_KEY, None)
    if store is not None:
        store.close()
