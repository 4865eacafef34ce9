"""MELL packing (cluster/mell*.py): size classes, Fig. 10's operations on hand-built cases,
the move bound, epoch netting, the transfer-or-re-prefill choice, and a seeded Poisson
workload against best-fit."""

from __future__ import annotations

import random

import pytest

from cadenza.cluster.kv_index import KVIndex
from cadenza.cluster.mell import (
    BestFitPacker,
    Mell,
    MellPacker,
    Migration,
    MigrationCosts,
    SizeClass,
    WorstFitPacker,
    choose_modes,
    classify,
)
from cadenza.cluster.mell_classes import PendingMove
from cadenza.cluster.placement import Turn, WorkerView

W = ["w0", "w1", "w2", "w3"]


def test_size_classes_follow_the_paper_and_a_worker_takes_its_largest_class():
    # C = 24: L (12, 24], M (8, 12], S (6, 8], T (3, 6], tiny [1, 3]
    expected = {24: "L", 13: "L", 12: "M", 9: "M", 8: "S", 7: "S", 6: "T", 4: "T", 3: "TINY"}
    for blocks, name in expected.items():
        assert classify(blocks, 24).name == name, blocks
    assert classify(1, 24) is SizeClass.TINY and classify(30, 24) is SizeClass.L
    packer = MellPacker(24)
    packer.allocate("tiny", 2, W)
    assert packer.worker_classes() == {"w0": "T"}  # tiny requests count as T
    packer.allocate("s", 7, W)
    assert packer.worker_classes() == {"w0": "S"}
    assert packer.class_counts() == {"TINY": 1, "T": 0, "S": 1, "M": 0, "L": 0}


def test_hand_computed_packing_evicts_a_t_request_for_an_m_beside_an_l():
    packer = MellPacker(24)
    assert packer.allocate("a", 14, W) == "w0"  # L: the first free worker
    assert packer.allocate("x", 5, W) == "w0"  # T: the L-worker with room
    # M: fits beside the L only without x (14 + 5 + 10 > 24): x is evicted, re-allocated
    # to the next free worker
    assert packer.allocate("m", 10, W) == "w0"
    assert packer.worker_of("x") == "w1"
    assert packer.allocate("s", 7, W) == "w1"  # S: no L room, no S/M-worker, best fit
    assert packer.load("w0") == 24 and packer.load("w1") == 12
    assert [r.moves for r in packer.op_log] == [0, 0, 1, 0]
    (move,) = packer.end_epoch()
    assert (move.request_id, move.src, move.dst, move.kv_blocks) == ("x", "w0", "w1", 5)
    assert packer.active_workers() == ["w0", "w1"] and packer.free_workers() == ["w2", "w3"]
    assert packer.utilisation() == pytest.approx(36 / 48)


def test_an_l_departing_hands_its_worker_back_when_the_rest_fits_elsewhere():
    packer = MellPacker(24)
    packer.allocate("a", 14, W)
    for k in range(3):
        assert packer.allocate(f"t{k}", 2, W) == "w0"
    assert packer.allocate("b", 13, W) == "w1"
    packer.depart("a")
    migrations = packer.end_epoch()
    assert sorted(m.request_id for m in migrations) == ["t0", "t1", "t2"]
    assert {(m.src, m.dst) for m in migrations} == {("w0", "w1")}
    assert packer.active_workers() == ["w1"] and "w0" in packer.free_workers()


def test_no_operation_moves_more_than_max_moves():
    packer = MellPacker(100, max_moves=10)
    packer.allocate("a", 60, W)
    for k in range(20):
        assert packer.allocate(f"t{k}", 2, W) == "w0"
    assert packer.allocate("b", 51, W) == "w1"
    packer.depart("a")  # re-allocating the 20 others would take 20 moves: none is made
    assert packer.end_epoch() == []
    assert packer.active_workers() == ["w0", "w1"]
    assert max(r.moves for r in packer.last_epoch_ops) == 0
    packer.update("b", 60)  # L grows within its worker: nothing to do
    assert packer.end_epoch() == []
    assert packer.stats.max_moves_in_op <= 10

    # the same departure with 3 others moves them only if the budget allows 3 moves
    for max_moves, moved in ((2, 0), (3, 3)):
        packer = MellPacker(24, max_moves=max_moves)
        packer.allocate("a", 14, W)
        for k in range(3):
            packer.allocate(f"t{k}", 2, W)
        packer.allocate("b", 13, W)
        packer.depart("a")
        assert len(packer.end_epoch()) == moved


def test_a_request_that_grows_out_of_its_worker_is_replaced_as_on_a_depart():
    # Fig. 10: an Update is a Depart and an Allocate, so the worker it leaves is refilled.
    packer = MellPacker(24)  # T (3, 6], S (6, 8]
    sizes = [6, 6, 6, 6, 5, 5, 6, 6, 5]
    placed = [packer.allocate(f"t{k}", b, W) for k, b in enumerate(sizes)]
    assert placed == ["w0"] * 4 + ["w1"] * 4 + ["w2"]  # T-workers, each filled in turn
    packer.update("t0", 8)  # T -> S: re-allocated where it fits (w2)
    moves = packer.end_epoch()
    # w0 is refilled with a T-request from the newer T-worker w1 (largest that fits)
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("t0", "w0", "w2"), ("t6", "w1", "w0")]
    assert [packer.load(w) for w in ("w0", "w1", "w2")] == [24, 16, 13]


def test_moves_cancel_within_an_epoch_and_chains_collapse():
    # x is evicted w0 -> w1 by an M; the M leaves and x grows to M: x is pulled back to w0
    packer = MellPacker(24)
    packer.allocate("a", 14, W)
    packer.allocate("x", 5, W)
    packer.allocate("m", 10, W)
    assert packer.worker_of("x") == "w1"
    packer.depart("m")
    packer.update("x", 9)
    assert packer.end_epoch() == []
    assert packer.worker_of("x") == "w0"
    assert sum(r.moves for r in packer.last_epoch_ops) == 2 and packer.stats.cancelled == 2

    # x goes w0 -> w1 (evicted), then grows past w1's room: w1 -> w2; one net move w0 -> w2
    packer = MellPacker(24)
    packer.allocate("a", 14, W)
    assert packer.allocate("b", 16, W) == "w1"
    assert packer.allocate("x", 5, W) == "w0"  # the L-worker with more room
    packer.allocate("m", 10, W)
    assert packer.worker_of("x") == "w1"
    packer.update("x", 9)  # 16 + 9 > 24
    (move,) = packer.end_epoch()
    assert (move.request_id, move.src, move.dst) == ("x", "w0", "w2")
    assert packer.stats.cancelled == 1 and packer.overflow_blocks() == 0

    # a request that finishes in the epoch it was moved in does not move
    packer = MellPacker(24)
    packer.allocate("a", 14, W)
    packer.allocate("x", 5, W)
    packer.allocate("m", 10, W)
    packer.depart("x")
    assert packer.end_epoch() == []


def test_transfer_or_reprefill_against_a_hand_computation():
    # transfer: 1000 B/block over 1e6 B/s = 1 ms/block; re-prefill: 16 tokens x 0.1 ms = 1.6 ms
    fast_link = MigrationCosts(1000, 1e6, 1e-4, 16)
    (m,) = choose_modes([PendingMove("r", "a", "b", 4)], fast_link)
    assert m.mode == "transfer" and m.est_s == pytest.approx(0.004)
    slow_link = MigrationCosts(1000, 1e5, 1e-4, 16)  # 10 ms/block
    (m,) = choose_modes([PendingMove("r", "a", "b", 4)], slow_link)
    assert m.mode == "reprefill" and m.est_s == pytest.approx(4 * 16 * 1e-4)
    (m,) = choose_modes([PendingMove("r", "a", "b", 4, source_lost=True)], fast_link)
    assert m.mode == "reprefill"

    # bounded epoch: a link carries 5000 B per worker, a destination re-prefills 64 tokens.
    # Largest first: r4 (4000 B) transfers; r3 would push "a"'s link to 7000 B, so it
    # re-prefills (48 tokens); r2 fits neither bin (link 6000 B, prefill 80 tokens) and
    # transfers over budget.
    bounded = MigrationCosts(1000, 1e6, 1e-4, 16, link_budget_bytes=5000, prefill_budget_tokens=64)
    moves = [PendingMove("r2", "a", "c", 2), PendingMove("r4", "a", "b", 4)]
    moves.insert(1, PendingMove("r3", "a", "c", 3))
    r2, r3, r4 = choose_modes(moves, bounded)
    assert (r4.mode, r4.within_budget) == ("transfer", True)
    assert (r3.mode, r3.within_budget) == ("reprefill", True)
    assert (r2.mode, r2.within_budget) == ("transfer", False)


def test_idle_workers_are_reported_free():
    packer = MellPacker({"w0": 10, "w1": 10})
    packer.allocate("r", 3, ["w0", "w1"])
    assert packer.active_workers() == ["w0"] and packer.free_workers() == ["w1"]
    packer.depart("r")
    assert packer.end_epoch() == []
    assert packer.active_workers() == [] and packer.free_workers() == ["w0", "w1"]
    assert packer.utilisation() == 0.0


def test_a_dead_worker_returns_its_requests_and_moves_out_of_it_reprefill():
    packer = MellPacker(24)
    packer.allocate("a", 14, W)
    packer.allocate("x", 5, W)
    packer.allocate("m", 10, W)  # x: w0 -> w1, planned
    assert sorted(packer.remove_worker("w0")) == [("a", 14), ("m", 10)]
    (move,) = packer.end_epoch()
    assert (move.request_id, move.src, move.dst, move.mode) == ("x", "w0", "w1", "reprefill")
    assert "w0" not in packer.workers()


def poisson_workload(seed: int, n: int = 250, capacity: int = 100) -> list[tuple]:
    """Arrivals at rate 2 per epoch; prompt KV log-normal (median ~10 blocks), growing
    linearly over a 10-60 epoch lifetime."""
    rng = random.Random(seed)
    now, out = 0.0, []
    for k in range(n):
        now += rng.expovariate(2.0)
        prompt = min(capacity, max(1, int(rng.lognormvariate(2.3, 0.9))))
        growth = min(capacity - prompt, int(rng.lognormvariate(1.8, 1.0)))
        out.append((f"r{k}", now, prompt, growth, rng.uniform(10, 60)))
    return out


def simulate(packer, workload, workers) -> tuple[int, list]:
    """Epochs of one time unit: arrivals, completions and growth, then ``end_epoch``;
    returns the peak of active workers and everything the packer decided."""
    pending, live, now, peak, trace = list(workload), {}, 0.0, 0, []
    while pending or live:
        now += 1.0
        while pending and pending[0][1] <= now:
            rid, *_ = spec = pending.pop(0)
            trace.append((rid, packer.allocate(rid, spec[2], workers)))
            live[rid] = spec
        for rid, (_, arrival, prompt, growth, life) in list(live.items()):
            if now - arrival >= life:
                packer.depart(rid)
                del live[rid]
            else:
                packer.update(rid, prompt + int(growth * (now - arrival) / life))
        trace.append(packer.end_epoch())
        for w in packer.workers():
            assert packer.load(w) <= packer.capacity(w), (now, w)
        peak = max(peak, len(packer.active_workers()))
    return peak, trace


@pytest.mark.parametrize("seed", [0, 3, 8])
def test_mell_never_needs_more_workers_than_best_fit_and_stays_within_capacity(seed):
    workers = [f"w{k:02d}" for k in range(60)]
    workload = poisson_workload(seed)
    mell = MellPacker(100)
    mell_peak, _ = simulate(mell, workload, workers)
    best_fit = BestFitPacker(100, preempt_on_overflow=True)  # within capacity too
    bf_peak, _ = simulate(best_fit, workload, workers)
    assert mell_peak <= bf_peak
    assert mell.stats.max_moves_in_op <= 10 and mell.stats.overflows == 0
    assert mell.stats.migrations > 0 and mell.peak_active >= mell_peak  # it counts mid-epoch


def test_same_inputs_same_decisions():
    workers = [f"w{k:02d}" for k in range(60)]
    workload = poisson_workload(5, n=120)
    first = simulate(MellPacker(100), workload, workers)
    second = simulate(MellPacker(100), workload, workers)
    assert first == second
    assert any(isinstance(m, list) and m and isinstance(m[0], Migration) for m in first[1])


def test_baselines_place_without_moving():
    best, worst = BestFitPacker(10), WorstFitPacker(10)
    for packer in (best, worst):
        assert packer.allocate("a", 6, W) == "w0"
        assert packer.allocate("b", 5, W) == "w1"  # 11 > 10: a new worker
    assert best.allocate("c", 3, W) == "w0"  # the least room that fits (4 < 5)
    assert worst.allocate("c", 3, W) == "w1"  # the most room
    best.update("a", 8)  # overflows w0 by 1: stays there (no migration)
    assert best.end_epoch() == [] and best.overflow_blocks() == 1
    preempting = BestFitPacker(10, preempt_on_overflow=True)
    for rid, blocks in (("a", 6), ("b", 5), ("c", 3)):
        preempting.allocate(rid, blocks, W)
    preempting.update("a", 8)
    (moved,) = preempting.end_epoch()
    assert (moved.request_id, moved.src, moved.dst, moved.mode) == ("a", "w0", "w2", "reprefill")
    assert preempting.overflow_blocks() == 0


def test_policy_places_sized_turns_and_reports_growth_and_finish():
    policy = Mell(KVIndex(), default_capacity_blocks=24)
    views = [WorkerView("w0", total_blocks=24), WorkerView("w1", total_blocks=24)]
    first = policy.place(Turn("s1", (), 14 * 16 - 3, 16), views)  # 221 tokens -> 14 blocks
    assert (first.worker_id, first.reason) == ("w0", "mell-allocate")
    assert policy.packer.size_of("s1") == 14
    second = policy.place(Turn(None, (), 20 * 16, 16), views, request_id="r2")
    assert second.worker_id == "w1"  # 14 + 20 > 24
    again = policy.place(Turn("s1", (), 15 * 16, 16), views)
    assert (again.worker_id, again.reason) == ("w0", "mell-resident")
    policy.on_grow("r2", 22)
    assert policy.drain_migrations() == []
    policy.on_finish("r2")
    assert policy.drain_migrations() == [] and policy.releasable_workers() == ["w1"]
    assert policy.on_worker_lost("w0") == ["s1"]
    with pytest.raises(LookupError):
        policy.place(Turn("s2", (), 16, 16), [WorkerView("w1", accepting=False)])
