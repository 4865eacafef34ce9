"""A request aborted while its KV is being fetched leaks no device block: the fetch lands as
ordinary cached blocks and every block returns to the free pool."""

from __future__ import annotations

from cadenza.core.request import RequestStatus
from cadenza.core.scheduler import Scheduler
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import JobKind
from tier_harness import ManualTransfer, make_request, step, tiered_scheduler

BS = 4
NUM_BLOCKS = 32
PROMPT = list(range(1, 26))  # 6 full blocks and one token


def setup() -> tuple[Scheduler, TierManager, ManualTransfer]:
    return tiered_scheduler(NUM_BLOCKS, host_slots=16, block_size=BS)


def cache_on_host_only(sched: Scheduler, prompt: list[int]) -> None:
    """Compute ``prompt``'s KV, copy it to host, and forget it on the device."""
    assert sched.tiers is not None
    sched.add_request(make_request("warm", prompt))
    while sched.has_unfinished_requests():
        step(sched)
    pool = sched.kv.pool
    sched.tiers.offload_now(pool.cached_free_blocks())
    assert sched.kv.reset_prefix_cache()
    assert sched.tiers.host is not None and len(sched.tiers.host) == len(PROMPT) // BS


def assert_no_leak(sched: Scheduler, tiers: TierManager) -> None:
    pool = sched.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not tiers._held
    assert not tiers._fetching
    assert tiers.num_pending_jobs == 0


def test_abort_during_host_fetch_frees_every_block():
    sched, tiers, xfer = setup()
    cache_on_host_only(sched, PROMPT)
    sched.add_request(make_request("a", PROMPT + [99]))
    step(sched)
    assert tiers.is_fetching("a") and [j.kind for j in xfer.queued] == [JobKind.FETCH]

    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    still_fetching = tiers.is_fetching("a")
    xfer.finish_all()
    tiers.poll()
    assert_no_leak(sched, tiers)
    assert not still_fetching  # nobody waits for that fetch any more
    # The copy was not wasted: the blocks are ordinary cached blocks now, found by the next turn.
    assert sched.kv.pool.num_cached_blocks == len(PROMPT) // BS
    sched.add_request(make_request("b", PROMPT + [99]))
    step(sched)
    assert sched.requests["b"].num_cached_tokens == len(PROMPT) // BS * BS
    while sched.has_unfinished_requests():
        step(sched)
    assert_no_leak(sched, tiers)


def test_reused_request_id_does_not_inherit_an_aborted_fetch():
    sched, tiers, xfer = setup()
    cache_on_host_only(sched, PROMPT)
    sched.add_request(make_request("a", PROMPT + [99]))
    step(sched)
    first = xfer.queued[0]
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    # The id comes back (a retry) while the first fetch is still in flight: it gets its own.
    sched.add_request(make_request("a", PROMPT + [99]))
    step(sched)
    assert tiers.is_fetching("a") and xfer.queued[-1].job_id != first.job_id
    xfer.queued.remove(first)  # the old fetch lands first, alone
    xfer._run(first)
    xfer.done.append(first)
    tiers.poll()
    assert tiers.is_fetching("a") and not tiers.held("a")
    while sched.has_unfinished_requests():
        xfer.finish_all()
        step(sched)
    assert_no_leak(sched, tiers)


def test_abort_every_request_after_a_failed_step():
    sched, tiers, xfer = setup()
    cache_on_host_only(sched, PROMPT)
    sched.add_request(make_request("run", list(range(200, 209)), max_tokens=4))
    step(sched)  # running now
    sched.add_request(make_request("f1", PROMPT + [99]))
    sched.add_request(make_request("f2", PROMPT[:13] + [98]))
    sched.add_request(make_request("new", list(range(300, 310))))
    out = sched.schedule()  # the step the model then fails on
    assert not out.is_empty
    assert tiers.is_fetching("f1")
    assert tiers.held("f2") or tiers.is_fetching("f2")  # holds device blocks for its turn
    for rid in list(sched.requests):
        sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    xfer.finish_all()
    tiers.poll()
    assert_no_leak(sched, tiers)
