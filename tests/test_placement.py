"""Placement policies on hand-built worker views and a KV index fed by events: each decision
checked against what the policy promises."""

from __future__ import annotations

import pytest

from cadenza.cluster.kv_index import KVIndex, block_keys
from cadenza.cluster.placement import CostParams, Turn, WorkerView, make_policy
from cadenza.core.kv_events import BlockStored
from cadenza.core.transfer import Tier

KEYS = tuple(block_keys(list(range(1, 161)), 16, "fp", None))  # 10 blocks


def turn(session="s", n=10) -> Turn:
    return Turn(session, KEYS[:n], n * 16 + 5, 16)


def views(*outstanding: int) -> list[WorkerView]:
    return [
        WorkerView(f"w{i}", num_running=o, waiting_tokens=0, total_blocks=100)
        for i, o in enumerate(outstanding)
    ]


def index_with(**held: tuple[Tier, int]) -> KVIndex:
    index = KVIndex()
    for worker, (tier, n) in held.items():
        index.apply(worker, [BlockStored(KEYS[:n], tier)])
    return index


def test_round_robin_cycles_and_skips_workers_not_accepting():
    policy = make_policy("round-robin", KVIndex())
    workers = views(0, 0, 0)
    assert [policy.place(turn(), workers).worker_id for _ in range(4)] == ["w0", "w1", "w2", "w0"]
    workers[1] = WorkerView("w1", accepting=False)
    assert {policy.place(turn(), workers).worker_id for _ in range(4)} == {"w0", "w2"}


def test_least_loaded_and_sticky():
    workers = views(3, 1, 2)
    assert make_policy("least-loaded", KVIndex()).place(turn(), workers).worker_id == "w1"
    sticky = make_policy("sticky", KVIndex())
    first = sticky.place(turn("a"), workers)
    assert (first.worker_id, first.reason) == ("w1", "sticky-new")
    # Still on w1 however loaded it gets, while it is alive.
    assert sticky.place(turn("a"), views(0, 9, 0)).worker_id == "w1"
    moved = sticky.place(turn("a"), [WorkerView("w0"), WorkerView("w1", accepting=False)])
    assert (moved.worker_id, moved.reason) == ("w0", "sticky-rehomed")


def test_kv_aware_trades_prefix_credit_against_load():
    index = index_with(w0=(Tier.DEVICE, 10), w1=(Tier.HOST, 4))
    policy = make_policy("kv-aware", index)
    # Idle cluster: the worker holding the whole prefix on device wins.
    placed = policy.place(turn(), views(0, 0))
    assert (placed.worker_id, placed.reason, placed.hits.device) == ("w0", "kv-hit", 10)
    # w0 swamped: 10 running requests (640 tokens of work) outweigh 165 tokens of prefill.
    busy = policy.place(turn(), views(10, 0))
    assert busy.worker_id == "w1" and busy.hits.host == 4


def test_kv_aware_moves_kv_only_when_the_link_beats_recompute():
    index = index_with(w0=(Tier.DEVICE, 10))
    fast = make_policy("kv-aware", index, CostParams(link_bytes_per_s=1e12))
    placed = fast.place(turn(), views(10, 0))
    assert (placed.worker_id, placed.migrate_from, placed.reason) == ("w1", "w0", "kv-moved")
    slow = make_policy("kv-aware", index, CostParams(link_bytes_per_s=1e6))
    placed = slow.place(turn(), views(10, 0))
    assert (placed.worker_id, placed.migrate_from, placed.reason) == ("w1", None, "recompute")


def test_symphony_places_at_hint_time_and_routes_once_the_kv_arrived():
    index = index_with(w0=(Tier.DEVICE, 10))
    policy = make_policy("symphony", index)
    hint = policy.on_hint(turn("s"), views(4, 1, 2))
    assert hint is not None and (hint.worker_id, hint.migrate_from) == ("w1", "w0")
    # A second hint meanwhile counts the first one's expected turn against w1.
    other = policy.on_hint(Turn("t", (), 20, 16), views(4, 1, 1))
    assert other is not None and other.worker_id == "w2"
    # The migration landed (w1's events say so): the turn goes to w1.
    index.apply("w1", [BlockStored(KEYS, Tier.DEVICE)])
    placed = policy.place(turn("s"), views(4, 1, 2))
    assert (placed.worker_id, placed.reason) == ("w1", "hinted")


def test_symphony_leaves_the_kv_where_it_is_when_the_load_is_nearly_even():
    index = index_with(w0=(Tier.DEVICE, 10))
    policy = make_policy("symphony", index)
    stay = policy.on_hint(turn("s"), views(2, 1))  # one request apart: not worth a move
    assert stay is not None and (stay.worker_id, stay.migrate_from) == ("w0", None)
    moved = policy.on_hint(turn("s"), views(3, 1))
    assert moved is not None and (moved.worker_id, moved.migrate_from) == ("w1", "w0")


def test_symphony_reroutes_a_hinted_turn_to_a_holder_that_is_cheaper_by_now():
    index = index_with(w0=(Tier.DEVICE, 10))
    policy = make_policy("symphony", index)
    hint = policy.on_hint(turn("s"), views(4, 0))
    assert hint is not None and (hint.worker_id, hint.migrate_from) == ("w1", "w0")
    index.apply("w1", [BlockStored(KEYS, Tier.DEVICE)])  # landed; w0 keeps its copy
    # By the time the turn comes, w1 is the busy one: w0 holds the same KV and costs less.
    placed = policy.place(turn("s"), views(0, 5))
    assert (placed.worker_id, placed.reason, placed.migrate_from) == ("w0", "hint-rerouted", None)
    assert placed.hits.device == 10


def test_symphony_falls_back_to_kv_aware_when_the_migration_is_late():
    index = index_with(w0=(Tier.DEVICE, 10))
    policy = make_policy("symphony", index)
    policy.on_hint(turn("s"), views(4, 0))
    late = policy.place(turn("s"), views(0, 0))
    assert (late.worker_id, late.reason) == ("w0", "hint-late")
    assert policy.place(turn("s"), views(0, 0)).reason == "kv-hit"  # the hint was used up


def test_unknown_policy_and_no_workers_are_clear_errors():
    with pytest.raises(ValueError, match="routing policy must be one of"):
        make_policy("random", KVIndex())
    with pytest.raises(LookupError, match="no worker is accepting"):
        make_policy("least-loaded", KVIndex()).place(turn(), [WorkerView("w0", accepting=False)])


def test_index_prefix_stops_at_the_first_missing_block_and_forgets_dead_workers():
    index = index_with(w0=(Tier.DEVICE, 3))
    index.apply("w0", [BlockStored(KEYS[4:8], Tier.DISK)])
    assert index.prefix_hits("w0", KEYS).by_tier() == {"device": 3, "host": 0, "disk": 0}
    index.apply("w0", [BlockStored(KEYS[3:4], Tier.HOST)])
    assert index.prefix_hits("w0", KEYS).by_tier() == {"device": 3, "host": 1, "disk": 4}
    index.forget("w0")
    assert index.prefix_hits("w0", KEYS).blocks == 0
