"""The ahead-of-time offload stops when the host tier cannot cover more device blocks.

It copies cached free device blocks to host until 25% of the pool is empty or has a host copy.
A host tier smaller than that target fills with copies of blocks the device still holds; each
further copy would evict one of those copies, uncovering another block to copy next, and an
idle engine would copy forever. These tests hold the copies to what the host can cover."""

from __future__ import annotations

from cadenza.core.transfer import JobKind
from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import Simulation
from cadenza.sim.trace import TraceTurn
from tier_harness import make_request, step, tiered_scheduler

BS = 4
NUM_BLOCKS = 32  # the offload target is 8 blocks empty or copied
HOST_SLOTS = 3


def test_idle_engine_copies_no_more_than_the_host_can_cover():
    sched, tiers, xfer = tiered_scheduler(NUM_BLOCKS, host_slots=HOST_SLOTS, block_size=BS)
    for i in range(5):  # 5 x 6 full blocks cached, 2 empty: 6 short of the target
        sched.add_request(make_request(f"r{i}", list(range(100 * i, 100 * i + 25))))
        while sched.has_unfinished_requests():
            xfer.finish_all()
            step(sched)
    pool = sched.kv.pool
    assert NUM_BLOCKS // 4 - pool.num_empty_blocks > HOST_SLOTS
    assert tiers.host is not None

    # The engine is idle now: only the offload runs, one job at a time, each landing at once.
    jobs = 0
    for _ in range(50):
        tiers.maintain()
        jobs += sum(1 for job in xfer.queued if job.kind == JobKind.OFFLOAD)
        xfer.finish_all()
        tiers.poll()
    assert jobs >= 1  # it did offload
    assert tiers.stats.offloaded_blocks == HOST_SLOTS  # and stopped once the host was full
    assert not xfer.queued and tiers.num_pending_jobs == 0
    covered = [b for b in pool.cached_free_blocks() if b.block_hash in tiers.host]
    assert len(covered) == HOST_SLOTS


def test_a_copy_that_gains_nothing_is_not_retried_until_the_device_changes():
    # The host's slots hold one recent copy of a block the device has dropped and two older
    # copies of cached free device blocks. The next copy made ahead of time evicts the oldest
    # host entry, a copy of a block still on the device: one block covered, one uncovered,
    # and so on forever while nothing else happens.
    now = [100.0]
    sched, tiers, xfer = tiered_scheduler(
        NUM_BLOCKS, host_slots=HOST_SLOTS, block_size=BS, clock=lambda: now[0]
    )
    pool, host = sched.kv.pool, tiers.host
    assert host is not None

    def run(rid: str, prompt: list[int]) -> None:
        sched.add_request(make_request(rid, prompt))
        while sched.has_unfinished_requests():
            step(sched)

    run("recent", list(range(900, 925)))
    tiers.offload_now(pool.cached_free_blocks()[:1])
    assert sched.kv.reset_prefix_cache() and len(host) == 1
    now[0] = 0.0  # the rest is older
    for i in range(5):
        run(f"r{i}", list(range(100 * i, 100 * i + 25)))
    tiers.offload_now(pool.cached_free_blocks()[:2])
    assert len(host) == HOST_SLOTS and tiers.stats.offloaded_blocks == HOST_SLOTS

    offload_jobs = 0
    for _ in range(20):
        tiers.maintain()
        offload_jobs += len(xfer.queued)
        xfer.finish_all()
        tiers.poll()
    assert offload_jobs == 1  # one try; it evicted the copy of a block the device holds
    covered = [b for b in pool.cached_free_blocks() if b.block_hash in host]
    assert len(covered) == 2

    # Once the device changes, the offload tries again.
    run("new", list(range(700, 725)))
    tiers.maintain()
    assert len(xfer.queued) == 1


def test_simulated_worker_with_a_small_host_goes_quiet_after_its_last_turn():
    # Llama-2-7B blocks are 8 MiB: 0.5 GiB of host is 64 slots, under the offload target of
    # 75 of the 300 device blocks. Six sessions need about twice the device pool. (The
    # previous code copied 35,544 blocks to host by t = 20 s here, 2,470 with the bound.)
    config = SimConfig(
        workers=1,
        cost_model="gpu",
        model="llama-2-7b",
        num_blocks=300,
        host_gib=0.5,
        disk_gib=4.0,
    )
    turns = []
    for s in range(6):
        turns.append(TraceTurn(f"s{s}", 1000, 32, arrival_s=0.5 * s))
        turns.extend(TraceTurn(f"s{s}", 200, 32, think_s=5.0) for _ in range(3))
    sim = Simulation(config, turns)
    worker = sim.workers[0]
    host = worker.core.scheduler.tiers.host
    assert host is not None and host.num_slots < 300 // 4
    tier_stats = worker.core.scheduler.tiers.stats
    seen: list[tuple[float, int, int]] = []  # (time, copies in flight, blocks copied to host)

    def look() -> None:
        seen.append((sim.events.now, worker.transfers.pending(), tier_stats.offloaded_blocks))
        # Long after the last turn. Before the fix, the copies were still chasing each other
        # here (and never stopped): fail instead of running on.
        assert seen[-1][1] == 0, f"still copying at {seen[-1][0]} s: {seen}"

    sim.events.at(60.0, look)
    sim.events.at(120.0, look)
    metrics = sim.run()
    assert metrics["turns"] == len(turns) and metrics["rejected_turns"] == 0
    assert max(r.finish_s for r in sim.client.records) < 60.0
    assert seen[0][2] > 0  # it did offload
    assert seen[0][2] == seen[1][2]  # and copied nothing once the turns were over
