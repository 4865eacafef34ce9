"""The durable conversation store: sessions and their turns, as exact token ids, in SQLite.

Why this exists: a stateful server keeps each session's KV cache warm between turns, but that
cache is only ever a *cache*. It can be evicted under memory pressure, lost with the GPU, or lost
with the whole process. What must never be lost is the information needed to rebuild it, and
that is the exact token sequence the model saw. Re-tokenizing the chat transcript is not good
enough: chat templates and tokenizers are not guaranteed to round-trip (whitespace merges,
special tokens, a sampled token sequence that is not the canonical tokenization of its own
text), so recomputed KV would silently differ from what the model attended to. So every turn
records the token ids it appended before generation and the ids it generated, exactly as
sampled; turn ``k``'s full prompt is ``history_token_ids()`` (before ``k``) followed by turn
``k``'s ``input_token_ids``.

Why SQLite in WAL mode: it is in the standard library, a committed transaction survives the
process being SIGKILLed at any instant (``synchronous=NORMAL`` in WAL mode only risks the last
transactions on an OS crash or power loss, never on a process crash, and never corruption), and
readers do not block the single writer. A turn is written twice: ``begin_turn`` commits it as
``pending`` before any generation starts and ``complete_turn`` commits the result. A process that
dies in between leaves a ``pending`` row, which ``recover_interrupted`` (called once at start-up)
turns into ``interrupted``; such turns, like ``aborted`` ones, are kept for the record but are
not part of the conversation's history.

Token ids are stored as BLOBs of little-endian int32, which is compact (a 100k-token
conversation is 400 KB, not megabytes of JSON) and cheap to decode with ``array``.

Concurrency: one connection (``check_same_thread=False``) guarded by a lock, so the engine
thread and a server thread can share a store. Every mutation is one ``BEGIN IMMEDIATE``
transaction, so read-check-write sequences (the next turn index, "no turn already pending") are
atomic even against another process writing the same file; a partial unique index additionally
makes two pending turns in one session impossible at the schema level.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cadenza.session.sqlite_db import SqliteDatabase

__all__ = [
    "ConversationStore",
    "SessionRecord",
    "TenantMismatchError",
    "TurnRecord",
    "TURN_STATUSES",
]

SCHEMA_VERSION = 1
TURN_STATUSES = ("pending", "complete", "aborted", "interrupted")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS sessions (
        session_id  TEXT PRIMARY KEY,
        tenant      TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        last_active REAL NOT NULL,
        num_turns   INTEGER NOT NULL DEFAULT 0,
        num_tokens  INTEGER NOT NULL DEFAULT 0,
        metadata    TEXT NOT NULL DEFAULT '{}'
    )
    """,
    "CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions(tenant, last_active)",
    "CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions(last_active)",
    """
    CREATE TABLE IF NOT EXISTS turns (
        session_id       TEXT NOT NULL
                         REFERENCES sessions(session_id) ON DELETE CASCADE,
        idx              INTEGER NOT NULL,
        request_id       TEXT NOT NULL,
        status           TEXT NOT NULL
                         CHECK (status IN ('pending', 'complete', 'aborted', 'interrupted')),
        input_token_ids  BLOB NOT NULL,
        output_token_ids BLOB NOT NULL DEFAULT x'',
        input_messages   TEXT NOT NULL DEFAULT '[]',
        output_text      TEXT NOT NULL DEFAULT '',
        finish_reason    TEXT,
        started_at       REAL NOT NULL,
        finished_at      REAL,
        PRIMARY KEY (session_id, idx)
    )
    """,
    # At most one turn in flight per session, enforced by the schema itself. It also serves
    # recover_interrupted's scan for pending turns.
    """
    CREATE UNIQUE INDEX IF NOT EXISTS turns_one_pending
        ON turns(session_id) WHERE status = 'pending'
    """,
)

# --- token id encoding -------------------------------------------------------------------------

_TYPECODE = next(code for code in ("i", "l") if array(code).itemsize == 4)
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _pack_ids(token_ids: Sequence[int]) -> bytes:
    try:
        packed = array(_TYPECODE, token_ids)
    except OverflowError:
        raise ValueError("token ids must fit in a signed 32-bit integer") from None
    if _BIG_ENDIAN_HOST:
        packed.byteswap()
    return packed.tobytes()


def _unpack_into(out: array, blob: bytes | None) -> None:
    if blob:
        if len(blob) % 4:
            raise ValueError(f"corrupt token blob of {len(blob)} bytes")
        out.frombytes(blob)


def _unpack_ids(blob: bytes | None) -> list[int]:
    out = array(_TYPECODE)
    _unpack_into(out, blob)
    if _BIG_ENDIAN_HOST:
        out.byteswap()
    return out.tolist()


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    tenant: str
    created_at: float  # time.time()
    last_active: float
    num_turns: int  # completed turns
    num_tokens: int  # len(history_token_ids)
    metadata: dict[str, Any]


@dataclass(frozen=True)
class TurnRecord:
    session_id: str
    index: int  # 0-based within the session
    request_id: str
    status: str  # "pending" | "complete" | "aborted" | "interrupted"
    # Tokens this turn appended before generation: the chat-template delta, including the new
    # message(s) and the generation prompt.
    input_token_ids: list[int]
    # Generated tokens exactly as sampled, including a final EOS if there was one.
    output_token_ids: list[int]
    input_messages: list[dict[str, Any]]
    output_text: str
    finish_reason: str | None
    started_at: float
    finished_at: float | None


class TurnInProgressError(ValueError):
    """The session already has a pending turn; a session runs one turn at a time."""


class TenantMismatchError(ValueError):
    """The session exists but belongs to another tenant (the other tenant is not named)."""


_SESSION_COLUMNS = "session_id, tenant, created_at, last_active, num_turns, num_tokens, metadata"
_TURN_COLUMNS = (
    "session_id, idx, request_id, status, input_token_ids, output_token_ids, input_messages,"
    " output_text, finish_reason, started_at, finished_at"
)


def _session_from_row(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(
        session_id=row["session_id"],
        tenant=row["tenant"],
        created_at=row["created_at"],
        last_active=row["last_active"],
        num_turns=row["num_turns"],
        num_tokens=row["num_tokens"],
        metadata=json.loads(row["metadata"]),
    )


def _turn_from_row(row: sqlite3.Row) -> TurnRecord:
    return TurnRecord(
        session_id=row["session_id"],
        index=row["idx"],
        request_id=row["request_id"],
        status=row["status"],
        input_token_ids=_unpack_ids(row["input_token_ids"]),
        output_token_ids=_unpack_ids(row["output_token_ids"]),
        input_messages=json.loads(row["input_messages"]),
        output_text=row["output_text"],
        finish_reason=row["finish_reason"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


# --- the store ---------------------------------------------------------------------------------


class ConversationStore(SqliteDatabase):
    """Sessions and their turns, durable across crashes; safe to share between threads.

    ``clock`` (default ``time.time``) supplies every timestamp; tests inject a fake one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = ":memory:",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, "conversation store")
        self._clock = clock
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: conversation store schema version {version} is newer than"
                    f" this code supports ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sessions --

    def create_session(
        self,
        session_id: str | None = None,
        *,
        tenant: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> SessionRecord:
        """Create a session; ``ValueError`` if the id is taken (by any tenant)."""
        sid = session_id if session_id is not None else f"sess_{uuid.uuid4().hex}"
        if not sid:
            raise ValueError("session id must be a non-empty string")
        meta = dict(metadata or {})
        meta_json = json.dumps(meta)
        now = self._clock()
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO sessions (session_id, tenant, created_at, last_active, metadata)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (sid, tenant, now, now, meta_json),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"session {sid} already exists") from None
        return SessionRecord(sid, tenant, now, now, 0, 0, meta)

    def get_session(self, session_id: str, *, tenant: str | None = None) -> SessionRecord | None:
        """The session, or None if missing or (with ``tenant`` given) owned by another tenant."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return _session_from_row(row)

    def get_or_create_session(
        self,
        session_id: str,
        *,
        tenant: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> SessionRecord:
        """The existing session (``metadata`` ignored) or a new one.

        Raises ``TenantMismatchError`` (a ``ValueError``) if the id belongs to another tenant.
        """
        if not session_id:
            raise ValueError("session id must be a non-empty string")
        meta = dict(metadata or {})
        now = self._clock()
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is not None:
                if row["tenant"] != tenant:
                    raise TenantMismatchError(f"session {session_id} belongs to another tenant")
                return _session_from_row(row)
            conn.execute(
                "INSERT INTO sessions (session_id, tenant, created_at, last_active, metadata)"
                " VALUES (?, ?, ?, ?, ?)",
                (session_id, tenant, now, now, json.dumps(meta)),
            )
        return SessionRecord(session_id, tenant, now, now, 0, 0, meta)

    def list_sessions(
        self, *, tenant: str | None = None, limit: int | None = 100
    ) -> list[SessionRecord]:
        """Sessions, most recently active first; all tenants when ``tenant`` is None."""
        sql = f"SELECT {_SESSION_COLUMNS} FROM sessions"
        params: list[Any] = []
        if tenant is not None:
            sql += " WHERE tenant = ?"
            params.append(tenant)
        sql += " ORDER BY last_active DESC, session_id LIMIT ?"
        params.append(-1 if limit is None else max(limit, 0))
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_session_from_row(row) for row in rows]

    def delete_session(self, session_id: str, *, tenant: str | None = None) -> bool:
        """Delete the session and all its turns; False if missing or another tenant's."""
        sql = "DELETE FROM sessions WHERE session_id = ?"
        params: tuple[Any, ...] = (session_id,)
        if tenant is not None:
            sql += " AND tenant = ?"
            params = (session_id, tenant)
        with self._write() as conn:
            return conn.execute(sql, params).rowcount > 0

    def update_metadata(self, session_id: str, metadata: dict[str, Any]) -> None:
        """Merge ``metadata`` into the session's (top-level keys overwrite)."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT metadata FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None:
                raise ValueError(f"session {session_id} does not exist")
            merged = json.loads(row["metadata"])
            merged.update(metadata)
            conn.execute(
                "UPDATE sessions SET metadata = ? WHERE session_id = ?",
                (json.dumps(merged), session_id),
            )

    # -- turns --

    def begin_turn(
        self,
        session_id: str,
        request_id: str,
        input_token_ids: Sequence[int],
        input_messages: list[dict[str, Any]] | None = None,
    ) -> int:
        """Record a ``pending`` turn before generation starts; returns its index.

        ``ValueError`` if the session does not exist or already has a turn in progress.
        """
        ids_blob = _pack_ids(input_token_ids)
        messages_json = json.dumps(list(input_messages or []))
        now = self._clock()
        with self._write() as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)
                ).fetchone()
                is None
            ):
                raise ValueError(f"session {session_id} does not exist")
            pending = conn.execute(
                "SELECT request_id FROM turns WHERE session_id = ? AND status = 'pending'",
                (session_id,),
            ).fetchone()
            if pending is not None:
                raise TurnInProgressError(
                    f"session {session_id} already has a turn in progress"
                    f" (request {pending['request_id']})"
                )
            index = conn.execute(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM turns WHERE session_id = ?",
                (session_id,),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO turns (session_id, idx, request_id, status, input_token_ids,"
                " input_messages, started_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)",
                (session_id, index, request_id, ids_blob, messages_json, now),
            )
            conn.execute(
                "UPDATE sessions SET last_active = MAX(last_active, ?) WHERE session_id = ?",
                (now, session_id),
            )
        return index

    def _turn_status_row(
        self, conn: sqlite3.Connection, session_id: str, index: int
    ) -> sqlite3.Row:
        row = conn.execute(
            "SELECT status, length(input_token_ids) AS input_bytes FROM turns"
            " WHERE session_id = ? AND idx = ?",
            (session_id, index),
        ).fetchone()
        if row is None:
            raise ValueError(f"session {session_id} has no turn {index}")
        return row

    def complete_turn(
        self,
        session_id: str,
        index: int,
        output_token_ids: Sequence[int],
        output_text: str,
        finish_reason: str | None,
    ) -> None:
        """Mark a pending turn complete; it becomes part of the session's history."""
        out_blob = _pack_ids(output_token_ids)
        now = self._clock()
        with self._write() as conn:
            row = self._turn_status_row(conn, session_id, index)
            if row["status"] != "pending":
                raise ValueError(
                    f"turn {index} of session {session_id} is {row['status']}, not pending"
                )
            conn.execute(
                "UPDATE turns SET status = 'complete', output_token_ids = ?, output_text = ?,"
                " finish_reason = ?, finished_at = ? WHERE session_id = ? AND idx = ?",
                (out_blob, output_text, finish_reason, now, session_id, index),
            )
            added = (row["input_bytes"] + len(out_blob)) // 4
            conn.execute(
                "UPDATE sessions SET last_active = MAX(last_active, ?), num_turns = num_turns + 1,"
                " num_tokens = num_tokens + ? WHERE session_id = ?",
                (now, added, session_id),
            )

    def abort_turn(self, session_id: str, index: int, reason: str = "aborted") -> None:
        """Mark a pending turn ``aborted`` (kept for the record, not part of history).

        Idempotent for a turn already aborted or interrupted; ``ValueError`` for a missing turn
        or one already complete (a completed turn cannot be taken out of history).
        """
        now = self._clock()
        with self._write() as conn:
            status = self._turn_status_row(conn, session_id, index)["status"]
            if status in ("aborted", "interrupted"):
                return
            if status != "pending":
                raise ValueError(
                    f"turn {index} of session {session_id} is {status}; it cannot be aborted"
                )
            conn.execute(
                "UPDATE turns SET status = 'aborted', finish_reason = ?, finished_at = ?"
                " WHERE session_id = ? AND idx = ?",
                (reason, now, session_id, index),
            )

    def recover_interrupted(self) -> int:
        """At start-up: mark every turn left ``pending`` by a dead process ``interrupted``.

        Only call this when no other live process is using the same file, since it cannot
        tell a dead writer's pending turn from a live one's. Returns how many were marked.
        """
        with self._write() as conn:
            return conn.execute(
                "UPDATE turns SET status = 'interrupted' WHERE status = 'pending'"
            ).rowcount

    def get_turn(self, session_id: str, index: int) -> TurnRecord | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE session_id = ? AND idx = ?",
                (session_id, index),
            ).fetchone()
        return None if row is None else _turn_from_row(row)

    def turn_of_request(self, request_id: str) -> TurnRecord | None:
        """The turn a request id ran as (the latest, if the id was reused), if any."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE request_id = ?"
                " ORDER BY started_at DESC LIMIT 1",
                (request_id,),
            ).fetchone()
        return None if row is None else _turn_from_row(row)

    def pending_turn(self, session_id: str) -> TurnRecord | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE session_id = ? AND status = 'pending'",
                (session_id,),
            ).fetchone()
        return None if row is None else _turn_from_row(row)

    def turns(self, session_id: str, *, include_incomplete: bool = False) -> list[TurnRecord]:
        """Complete turns (or all turns) of the session, ordered by index."""
        sql = f"SELECT {_TURN_COLUMNS} FROM turns WHERE session_id = ?"
        if not include_incomplete:
            sql += " AND status = 'complete'"
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY idx", (session_id,)).fetchall()
        return [_turn_from_row(row) for row in rows]

    def history_token_ids(self, session_id: str) -> list[int]:
        """Every token the model has seen in this session: input then output of each complete
        turn, in order. Empty for an unknown session."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT input_token_ids, output_token_ids FROM turns"
                " WHERE session_id = ? AND status = 'complete' ORDER BY idx",
                (session_id,),
            ).fetchall()
        out = array(_TYPECODE)
        for inp, outp in rows:
            _unpack_into(out, inp)
            _unpack_into(out, outp)
        if _BIG_ENDIAN_HOST:
            out.byteswap()
        return out.tolist()

    def messages(self, session_id: str) -> list[dict[str, Any]]:
        """The chat transcript of complete turns: each turn's new messages, then its reply."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT input_messages, output_text FROM turns"
                " WHERE session_id = ? AND status = 'complete' ORDER BY idx",
                (session_id,),
            ).fetchall()
        transcript: list[dict[str, Any]] = []
        for messages_json, output_text in rows:
            transcript.extend(json.loads(messages_json))
            transcript.append({"role": "assistant", "content": output_text})
        return transcript

    def turn_gaps(self, session_id: str) -> list[float]:
        """Seconds from each complete turn's end to the start of the turn after it (of any
        status): the user's think time, which decides whether keeping KV warm pays off."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT status, started_at, finished_at FROM turns WHERE session_id = ?"
                " ORDER BY idx",
                (session_id,),
            ).fetchall()
        return [
            nxt["started_at"] - cur["finished_at"]
            for cur, nxt in zip(rows, rows[1:], strict=False)
            if cur["status"] == "complete" and cur["finished_at"] is not None
        ]
