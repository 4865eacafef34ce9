"""Tests for the durable conversation store: exact token history, tenants, crashes, threads.

The crash tests run the writer in a child process and SIGKILL it, because the property that
matters (committed turns survive, the in-flight one is recoverable) only shows up when the
process dies without closing anything.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cadenza.session.store import (
    ConversationStore,
    SessionRecord,
    TenantMismatchError,
    TurnRecord,
)

SRC = Path(__file__).resolve().parents[1] / "src"


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock):
    s = ConversationStore(tmp_path / "db" / "conv.sqlite", clock=clock)
    yield s
    s.close()


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _run_child(script: str, db_path: Path, **popen_kwargs) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(db_path)], env=env, **popen_kwargs
    )


# --- sessions ----------------------------------------------------------------------------------


def test_create_get_list_delete(store: ConversationStore, clock: FakeClock) -> None:
    a = store.create_session("a", tenant="t1", metadata={"model": "m"})
    assert a == SessionRecord("a", "t1", 1_000.0, 1_000.0, 0, 0, {"model": "m"})
    assert store.get_session("a") == a
    assert store.get_session("missing") is None

    clock.advance(1)
    generated = store.create_session(tenant="t1")
    assert generated.session_id.startswith("sess_") and len(generated.session_id) == 5 + 32
    clock.advance(1)
    store.create_session("c", tenant="t2")

    assert [s.session_id for s in store.list_sessions()] == ["c", generated.session_id, "a"]
    assert [s.session_id for s in store.list_sessions(tenant="t1")] == [generated.session_id, "a"]
    assert [s.session_id for s in store.list_sessions(limit=1)] == ["c"]

    # Activity reorders: a turn in "a" makes it the most recently active.
    clock.advance(1)
    store.complete_turn("a", store.begin_turn("a", "r", [1]), [2], "x", "stop")
    assert store.list_sessions()[0].session_id == "a"

    assert store.delete_session("a") is True
    assert store.delete_session("a") is False
    assert store.get_session("a") is None
    assert len(store.list_sessions(limit=None)) == 2


def test_duplicate_session_id(store: ConversationStore) -> None:
    store.create_session("dup")
    with pytest.raises(ValueError, match="dup"):
        store.create_session("dup")
    with pytest.raises(ValueError, match="dup"):
        store.create_session("dup", tenant="someone-else")


def test_tenant_isolation(store: ConversationStore) -> None:
    store.create_session("s", tenant="alice")
    assert store.get_session("s", tenant="alice") is not None
    assert store.get_session("s", tenant="bob") is None
    assert store.list_sessions(tenant="bob") == []
    with pytest.raises(TenantMismatchError) as excinfo:
        store.get_or_create_session("s", tenant="bob")
    assert isinstance(excinfo.value, ValueError)
    assert "alice" not in str(excinfo.value)  # never reveal who owns it
    assert store.delete_session("s", tenant="bob") is False
    assert store.get_session("s") is not None
    assert store.delete_session("s", tenant="alice") is True


def test_get_or_create_and_metadata(store: ConversationStore) -> None:
    created = store.get_or_create_session("g", tenant="t", metadata={"a": 1})
    again = store.get_or_create_session("g", tenant="t", metadata={"ignored": True})
    assert again == created
    store.update_metadata("g", {"b": 2})
    store.update_metadata("g", {"a": 3})
    assert store.get_session("g").metadata == {"a": 3, "b": 2}
    with pytest.raises(ValueError, match="nope"):
        store.update_metadata("nope", {})


def test_delete_cascades_turns(store: ConversationStore, tmp_path: Path) -> None:
    store.create_session("s")
    store.complete_turn("s", store.begin_turn("s", "r0", [1, 2]), [3], "x", "stop")
    store.begin_turn("s", "r1", [4])
    assert store.delete_session("s")
    raw = sqlite3.connect(store.path)
    assert raw.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
    raw.close()
    assert store.turns("s", include_incomplete=True) == []


# --- turns -------------------------------------------------------------------------------------


def test_turns_history_and_messages(store: ConversationStore, clock: FakeClock) -> None:
    store.create_session("s")
    assert store.history_token_ids("s") == []

    i0 = store.begin_turn("s", "req-0", [1, 2, 3], _user("hi"))
    assert i0 == 0
    pending = store.pending_turn("s")
    assert pending is not None and pending.status == "pending" and pending.request_id == "req-0"
    assert store.history_token_ids("s") == []  # pending turns are not history yet
    clock.advance(2)
    store.complete_turn("s", i0, [151_000, 151_645], "hello", "stop")
    assert store.pending_turn("s") is None

    i1 = store.begin_turn("s", "req-1", [4, 5], _user("more"))
    assert i1 == 1
    store.complete_turn("s", i1, [], "", "length")  # empty output round-trips

    assert store.history_token_ids("s") == [1, 2, 3, 151_000, 151_645, 4, 5]
    assert store.messages("s") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": ""},
    ]
    record = store.get_session("s")
    assert record.num_turns == 2
    assert record.num_tokens == 7 == len(store.history_token_ids("s"))
    assert record.last_active == 1_002.0

    first, second = store.turns("s")
    assert first == TurnRecord(
        session_id="s",
        index=0,
        request_id="req-0",
        status="complete",
        input_token_ids=[1, 2, 3],
        output_token_ids=[151_000, 151_645],
        input_messages=_user("hi"),
        output_text="hello",
        finish_reason="stop",
        started_at=1_000.0,
        finished_at=1_002.0,
    )
    assert second.output_token_ids == [] and second.finish_reason == "length"
    assert store.get_turn("s", 1) == second
    assert store.get_turn("s", 7) is None


def test_prompt_is_history_plus_input(store: ConversationStore) -> None:
    store.create_session("s")
    prompts = []
    for k in range(4):
        inp = [10 * k + 1, 10 * k + 2]
        prompts.append(store.history_token_ids("s") + inp)
        idx = store.begin_turn("s", f"r{k}", inp)
        store.complete_turn("s", idx, [10 * k + 9], f"out{k}", "stop")
    # Each prompt is a prefix of the final history: the KV of earlier turns is reusable.
    final = store.history_token_ids("s")
    for prompt in prompts:
        assert final[: len(prompt)] == prompt


def test_tokens_stored_little_endian_int32(store: ConversationStore) -> None:
    store.create_session("s")
    store.begin_turn("s", "r", [0, 1, 151_000, 2**31 - 1, -1])
    raw = sqlite3.connect(store.path)
    blob = raw.execute("SELECT input_token_ids FROM turns").fetchone()[0]
    raw.close()
    assert blob == struct.pack("<5i", 0, 1, 151_000, 2**31 - 1, -1)
    with pytest.raises(ValueError, match="32-bit"):
        store.begin_turn("s", "r2", [2**31])


def test_one_turn_at_a_time(store: ConversationStore) -> None:
    store.create_session("s")
    with pytest.raises(ValueError, match="does not exist"):
        store.begin_turn("missing", "r", [1])
    idx = store.begin_turn("s", "first", [1])
    with pytest.raises(
        ValueError, match=r"session s already has a turn in progress \(request first\)"
    ):
        store.begin_turn("s", "second", [2])
    store.complete_turn("s", idx, [3], "x", "stop")
    with pytest.raises(ValueError, match="complete, not pending"):
        store.complete_turn("s", idx, [3], "x", "stop")
    with pytest.raises(ValueError, match="no turn 5"):
        store.complete_turn("s", 5, [3], "x", "stop")
    assert store.begin_turn("s", "second", [2]) == 1


def test_abort_excluded_from_history(store: ConversationStore) -> None:
    store.create_session("s")
    store.complete_turn("s", store.begin_turn("s", "r0", [1], _user("a")), [2], "b", "stop")
    aborted = store.begin_turn("s", "r1", [3], _user("c"))
    store.abort_turn("s", aborted, reason="client disconnected")
    store.abort_turn("s", aborted)  # idempotent
    with pytest.raises(ValueError, match="cannot be aborted"):
        store.abort_turn("s", 0)

    turn = store.get_turn("s", aborted)
    assert turn.status == "aborted" and turn.finish_reason == "client disconnected"
    assert store.history_token_ids("s") == [1, 2]
    assert store.messages("s") == [*_user("a"), {"role": "assistant", "content": "b"}]
    assert [t.index for t in store.turns("s")] == [0]
    assert [t.index for t in store.turns("s", include_incomplete=True)] == [0, 1]
    assert store.get_session("s").num_turns == 1
    assert store.get_session("s").num_tokens == 2
    # The next turn gets the next index, and the history stays contiguous.
    nxt = store.begin_turn("s", "r2", [4])
    assert nxt == 2
    store.complete_turn("s", nxt, [5], "d", "stop")
    assert store.history_token_ids("s") == [1, 2, 4, 5]


def test_turn_gaps(store: ConversationStore, clock: FakeClock) -> None:
    store.create_session("s")
    assert store.turn_gaps("s") == []
    idx = store.begin_turn("s", "r0", [1])
    clock.advance(1.5)
    store.complete_turn("s", idx, [2], "x", "stop")  # finished at 1001.5
    clock.advance(30)
    idx = store.begin_turn("s", "r1", [3])  # started at 1031.5
    clock.advance(2)
    store.abort_turn("s", idx)
    clock.advance(4)
    idx = store.begin_turn("s", "r2", [4])  # after an aborted turn: no gap counted
    clock.advance(1)
    store.complete_turn("s", idx, [5], "y", "stop")  # finished at 1038.5
    clock.advance(120)
    store.begin_turn("s", "r3", [6])  # started at 1158.5
    assert store.turn_gaps("s") == pytest.approx([30.0, 120.0])


# --- persistence and crashes -------------------------------------------------------------------


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "conv.sqlite"
    with ConversationStore(path) as s:
        assert s.path == str(path)
        assert s.journal_mode == "wal"
        s.create_session("s")
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    raw.execute("PRAGMA user_version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(RuntimeError, match="newer"):
        ConversationStore(path)


def test_in_memory_store() -> None:
    with ConversationStore() as s:
        s.create_session("s")
        s.complete_turn("s", s.begin_turn("s", "r", [1]), [2], "x", "stop")
        assert s.history_token_ids("s") == [1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        s.get_session("s")


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "conv.sqlite"
    with ConversationStore(path) as s:
        s.create_session("s", tenant="t", metadata={"k": "v"})
        s.complete_turn("s", s.begin_turn("s", "r", [1, 2], _user("q")), [3], "a", "stop")
        before = (s.get_session("s"), s.turns("s"))
    with ConversationStore(path) as s:
        assert (s.get_session("s"), s.turns("s")) == before


def test_sigkill_mid_turn_is_recoverable(tmp_path: Path) -> None:
    db = tmp_path / "conv.sqlite"
    child = _run_child(
        """
        import os, signal, sys
        from cadenza.session.store import ConversationStore
        assert "torch" not in sys.modules, "the store must stay torch-free"
        s = ConversationStore(sys.argv[1])
        s.create_session("s1", tenant="t")
        for k in range(3):
            i = s.begin_turn("s1", f"r{k}", [k, 151_000], [{"role": "user", "content": f"m{k}"}])
            s.complete_turn("s1", i, [100 + k, 151_645], f"reply {k}", "stop")
        s.begin_turn("s1", "r3", [7, 8, 9], [{"role": "user", "content": "m3"}])
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        db,
        stderr=subprocess.PIPE,
    )
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, stderr.decode()

    with ConversationStore(db) as s:
        expected = []
        for k in range(3):
            expected += [k, 151_000, 100 + k, 151_645]
        assert s.history_token_ids("s1") == expected
        assert [t.output_text for t in s.turns("s1")] == ["reply 0", "reply 1", "reply 2"]
        pending = s.pending_turn("s1")
        assert pending is not None and pending.request_id == "r3"
        assert pending.input_token_ids == [7, 8, 9]

        assert s.recover_interrupted() == 1
        assert s.recover_interrupted() == 0
        assert s.pending_turn("s1") is None
        interrupted = s.get_turn("s1", 3)
        assert interrupted.status == "interrupted" and interrupted.finished_at is None
        assert s.history_token_ids("s1") == expected
        assert len(s.messages("s1")) == 6
        assert s.get_session("s1").num_turns == 3
        assert s.get_session("s1").num_tokens == len(expected)

        idx = s.begin_turn("s1", "r4", [42])
        assert idx == 4
        s.complete_turn("s1", idx, [43], "ok", "stop")
        assert s.history_token_ids("s1") == [*expected, 42, 43]


def test_sigkill_at_an_arbitrary_moment(tmp_path: Path) -> None:
    """Kill a writer that is committing as fast as it can; every acknowledged turn survives."""
    db = tmp_path / "conv.sqlite"
    child = _run_child(
        """
        import sys
        from cadenza.session.store import ConversationStore
        s = ConversationStore(sys.argv[1])
        s.create_session("s")
        for k in range(1_000_000):
            i = s.begin_turn("s", f"r{k}", list(range(k % 50)))
            s.complete_turn("s", i, [k] * (k % 7), "x" * (k % 7), "stop")
            print(k, flush=True)
        """,
        db,
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged = -1
    deadline = time.monotonic() + 30
    try:
        while acknowledged < 150 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "writer exited early"
            acknowledged = int(line)
    finally:
        child.kill()  # SIGKILL, while it is in the middle of more writes
        child.wait(timeout=30)
        child.stdout.close()
    assert acknowledged >= 150

    with ConversationStore(db) as s:
        raw = sqlite3.connect(db)
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        raw.close()
        complete = s.turns("s")
        assert len(complete) > acknowledged
        assert [t.index for t in complete] == list(range(len(complete)))
        for t in complete:
            k = t.index
            assert t.input_token_ids == list(range(k % 50))
            assert t.output_token_ids == [k] * (k % 7)
        assert s.recover_interrupted() in (0, 1)
        record = s.get_session("s")
        assert record.num_turns == len(complete)
        assert record.num_tokens == len(s.history_token_ids("s"))
        assert s.pending_turn("s") is None


def test_second_connection_sees_pending_turn(tmp_path: Path) -> None:
    path = tmp_path / "conv.sqlite"
    with ConversationStore(path) as a, ConversationStore(path) as b:
        a.create_session("s")
        a.begin_turn("s", "ra", [1])
        with pytest.raises(ValueError, match="in progress"):
            b.begin_turn("s", "rb", [2])
        assert b.pending_turn("s").request_id == "ra"


# --- threads -----------------------------------------------------------------------------------


def test_threads_append_concurrently(store: ConversationStore) -> None:
    n = 60
    errors: list[BaseException] = []

    def worker(sid: str, base: int) -> None:
        try:
            store.create_session(sid)
            for k in range(n):
                idx = store.begin_turn(sid, f"{sid}-{k}", [base + k])
                store.complete_turn(sid, idx, [base + k + 1], str(k), "stop")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"s{j}", 10_000 * j)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    for j in range(2):
        base = 10_000 * j
        expected = [tok for k in range(n) for tok in (base + k, base + k + 1)]
        assert store.history_token_ids(f"s{j}") == expected
        assert store.get_session(f"s{j}").num_turns == n


def test_threads_race_for_one_session(store: ConversationStore) -> None:
    store.create_session("s")
    barrier = threading.Barrier(8)
    results: list[str] = []

    def worker(j: int) -> None:
        barrier.wait()
        try:
            store.begin_turn("s", f"r{j}", [j])
            results.append("ok")
        except ValueError:
            results.append("refused")

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["ok"] + ["refused"] * 7
    assert len(store.turns("s", include_incomplete=True)) == 1
