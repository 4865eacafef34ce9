"""Admission on the real core objects (scheduler, KV cache manager, block pool, tier manager)
with a fake synchronous transfer executor and no model: nothing waits forever at the head of
the queue, a request waiting for a KV fetch is overtaken a bounded number of times, and the
per-tier cache accounting counts what admission actually reused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.eviction import LRUEviction
from cadenza.core.hashing import hash_seed
from cadenza.core.request import Request, RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler, SchedulerOutput
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import JobKind, Tier, TransferItem, TransferJob

SEED = hash_seed("fake-model", None)


def clock() -> float:
    return 0.0


class FakeExecutor:
    """A synchronous ``TransferExecutor``: a job is done when submitted (each item ok unless
    ``fail`` says otherwise), except fetches while ``hold_fetches`` is set, which wait for
    ``release``."""

    def __init__(
        self, fail: Callable[[TransferItem], bool] | None = None, hold_fetches: bool = False
    ) -> None:
        self.fail = fail or (lambda item: False)
        self.hold_fetches = hold_fetches
        self.held: list[TransferJob] = []
        self.done: list[TransferJob] = []
        self.submitted: list[TransferJob] = []

    def _finish(self, job: TransferJob) -> None:
        for item in job.items:
            item.ok = not self.fail(item)

    def submit(self, job: TransferJob) -> None:
        self.submitted.append(job)
        if self.hold_fetches and job.kind == JobKind.FETCH:
            self.held.append(job)
            return
        self._finish(job)
        self.done.append(job)

    def run_now(self, job: TransferJob) -> None:
        self._finish(job)

    def release(self) -> None:
        for job in self.held:
            self._finish(job)
            self.done.append(job)
        self.held.clear()

    def poll(self) -> list[TransferJob]:
        done, self.done = self.done, []
        return done

    def wait(self, timeout: float) -> list[TransferJob]:
        return self.poll()

    def pending(self) -> int:
        return len(self.done) + len(self.held)


class FakeDisk(set[bytes]):
    """The disk tier's index: which keys have a file."""


def make_scheduler(
    num_blocks: int,
    *,
    block_size: int = 4,
    budget: int = 2048,
    reserve: float = 0.0,
    chunked: bool = True,
    max_seqs: int = 64,
    caching: bool = True,
    **kwargs: int,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked
        ),
        CacheConfig(
            block_size=block_size,
            admission_reserve_fraction=reserve,
            enable_prefix_caching=caching,
        ),
        num_blocks,
        clock=clock,
        **kwargs,
    )


def attach_tiers(
    sched: Scheduler, executor: FakeExecutor, *, host_slots: int = 0, disk: FakeDisk | None = None
) -> TierManager:
    tiers = TierManager(
        sched.kv.pool,
        host_slots=host_slots,
        disk=disk,
        executor=executor,
        policy=LRUEviction(clock),
        clock=clock,
        write_through=False,
    )
    sched.tiers = tiers
    return tiers


def make_request(
    rid: str,
    tokens: list[int],
    max_tokens: int = 4,
    *,
    block_size: int = 4,
    arrival: float = 0.0,
    session: str | None = None,
) -> Request:
    request = Request(
        request_id=rid,
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        eos_token_ids=(0,),
        block_size=block_size,
        hash_seed=SEED,
        max_total_tokens=len(tokens) + max_tokens,
        arrival_time=arrival,
    )
    request.session_id = session
    return request


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def step(sched: Scheduler, admitted: list[str] | None = None) -> SchedulerOutput:
    """One engine step with a fake model: apply finished copies, schedule, sample 7; appends
    the requests admitted in this step to ``admitted``."""
    if sched.tiers is not None:
        sched.tiers.poll()
    running = {r.request_id for r in sched.running}
    out = sched.schedule()
    if admitted is not None:
        admitted += [
            c.request.request_id for c in out.chunks if c.request.request_id not in running
        ]
    sampled = {c.request.request_id: 7 for c in out.chunks if c.samples}
    sched.update_from_output(out, sampled)
    return out


def run_until_done(sched: Scheduler, max_steps: int = 500) -> list[str]:
    """Step until every request finished; returns request ids in order of admission."""
    admitted: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return admitted
        step(sched, admitted)
    waiting = [r.request_id for r in sched.waiting]
    raise AssertionError(f"requests never finished; waiting: {waiting}")


# ------------------------------------------------------------------ 1. no wedge at the head


def test_request_needing_more_than_pool_minus_reserve_runs_on_an_idle_engine() -> None:
    # 72 blocks of 16 tokens, reserve 10% = 7 blocks: a 1,090-token prompt with 8 tokens to
    # generate needs 69 blocks > 72 - 7, but fits the idle pool.
    sched = make_scheduler(72, block_size=16, reserve=0.10)
    assert sched.reserve_blocks == 7
    big = make_request("big", tokens(1, 1090), 8, block_size=16)
    after = make_request("after", tokens(5000, 20), 2, block_size=16, arrival=1.0)
    sched.add_request(big)
    sched.add_request(after)
    out = step(sched)
    assert [c.request.request_id for c in out.chunks] == ["big"]  # the reserve protects "big"
    assert run_until_done(sched) == ["after"]
    assert big.status == RequestStatus.FINISHED_LENGTH and big.num_output_tokens == 8
    assert sched.kv.pool.num_free_blocks == 72


def test_request_that_can_never_fit_is_refused_at_submission_with_the_numbers() -> None:
    sched = make_scheduler(72, block_size=16, reserve=0.10)
    # 1,090 + 80 tokens need 74 blocks: the check is on the largest total, not the prompt.
    with pytest.raises(ValueError, match=r"may need 74 KV blocks but the cache has 72"):
        sched.add_request(make_request("long", tokens(1, 1090), 80, block_size=16))
    assert not sched.has_unfinished_requests()


def test_prompt_over_the_step_budget_without_chunked_prefill_is_refused() -> None:
    sched = make_scheduler(64, budget=32, chunked=False)
    with pytest.raises(ValueError, match=r"40 prompt tokens .* 32"):
        sched.add_request(make_request("long", tokens(1, 40)))
    sched.add_request(make_request("fits", tokens(1, 30)))
    assert run_until_done(sched) == ["fits"]


def test_preempted_request_longer_than_budget_recomputes_without_chunked_prefill() -> None:
    # Chunked prefill off; a preempted request's recompute (prompt + output so far) is longer
    # than one step's budget (and nothing of it is cached), so it can only go back in chunks.
    sched = make_scheduler(8, budget=16, chunked=False, caching=False)
    sched.add_request(make_request("old", tokens(1, 4), 24, arrival=0.0))
    new = make_request("new", tokens(100, 14), 12, arrival=1.0)
    sched.add_request(new)
    run_until_done(sched)
    assert new.num_preemptions >= 1 and new.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.pool.num_free_blocks == 8


def long_turn_scenario(sched: Scheduler) -> Request:
    """A short request and a long turn that outgrows pool - reserve: the long one is the
    newest, so it is preempted when they collide, and must come back to finish alone."""
    sched.add_request(make_request("short", tokens(1, 4), 20, arrival=0.0))
    long_turn = make_request("long", tokens(100, 56), 12, arrival=1.0, session="s")
    sched.add_request(long_turn)
    return long_turn


def test_preempted_long_turn_returns_when_cached_plus_new_plus_reserve_exceed_pool() -> None:
    # 20 blocks of 4, reserve 5. "long" (56 + 12 tokens = 17 blocks) is admitted by its first
    # 8-token chunk; once it holds 16 blocks it is preempted, and re-admission needs its 15
    # cached blocks + 1 + the reserve = 21 > 20.
    sched = make_scheduler(20, budget=8, reserve=0.25)
    long_turn = long_turn_scenario(sched)
    run_until_done(sched)
    assert long_turn.num_preemptions >= 1
    assert long_turn.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.pool.num_free_blocks == 20


def test_long_session_turn_swapped_out_comes_back_through_the_host_tier() -> None:
    # As above, but the preempted turn's device copies are evicted before it returns, so it
    # fetches its 15 blocks back from host (and may use the whole pool for that, with nothing
    # running).
    sched = make_scheduler(20, budget=8, reserve=0.25)
    tiers = attach_tiers(sched, FakeExecutor(), host_slots=64, disk=FakeDisk())
    long_turn = long_turn_scenario(sched)
    for _ in range(100):
        step(sched)
        if long_turn.num_preemptions:
            break
    assert long_turn.status == RequestStatus.PREEMPTED
    assert tiers.stats.offloaded_blocks >= 15
    for block in sched.kv.pool.cached_free_blocks():
        sched.kv.pool.drop(block)  # evicted under pressure; the host copies remain
    run_until_done(sched)
    assert tiers.stats.fetched_blocks["host"] >= 15
    assert long_turn.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.pool.num_free_blocks == 20


def test_head_blocked_only_by_blocks_fetched_for_a_later_waiter_is_admitted() -> None:
    # "held" had its KV fetched from host and holds those device blocks until it is admitted;
    # "big", ahead of it (a preempted request goes back to the front), fits only if those
    # holds are let go. Nothing runs, so letting them go is the only way forward.
    sched = make_scheduler(20, budget=64)
    executor = FakeExecutor(hold_fetches=True)
    tiers = attach_tiers(sched, executor, host_slots=32)
    first = make_request("first", tokens(1, 40), 1, session="s")
    sched.add_request(first)
    run_until_done(sched)
    blocks = [b for b in sched.kv.pool.blocks if b.block_hash is not None]
    tiers.offload_now(blocks)
    for block in blocks:
        sched.kv.pool.drop(block)
    held = make_request("held", tokens(1, 40) + [7, 9, 9], 1, session="s")
    sched.add_request(held)
    step(sched)  # starts the fetch of its 10 blocks from host
    executor.release()
    executor.hold_fetches = False
    tiers.poll()
    assert len(tiers.held("held")) == 10 and not sched.running
    big = make_request("big", tokens(500, 60), 8)  # 17 blocks, 10 free
    sched.add_request(big)
    sched.waiting.remove(big)
    sched.waiting.appendleft(big)
    assert run_until_done(sched) == ["big", "held"]
    assert sched.kv.pool.num_free_blocks == 20


# ------------------------------------------------------------ 2. bounded overtaking of a fetch


def put_history_on_disk(disk: FakeDisk, history: list[int]) -> None:
    """List the full blocks of ``history`` on disk (none on host or device)."""
    disk.update(make_request("probe", history).block_hashes)


@pytest.mark.parametrize("max_overtakes", [None, 2])
def test_fetch_waiter_is_overtaken_at_most_k_times(max_overtakes: int | None) -> None:
    bound = 16 if max_overtakes is None else max_overtakes  # None: the default
    kwargs = {} if max_overtakes is None else {"max_fetch_overtakes": max_overtakes}
    sched = make_scheduler(256, budget=64, **kwargs)
    executor = FakeExecutor(hold_fetches=True)
    disk = FakeDisk()
    attach_tiers(sched, executor, disk=disk)
    history = tokens(1, 32)
    put_history_on_disk(disk, history)
    sched.add_request(make_request("waiter", history + [50, 51], 2, arrival=0.0))
    others = [f"r{i}" for i in range(bound + 3)]
    for i, rid in enumerate(others):
        sched.add_request(make_request(rid, tokens(1000 + 10 * i, 3), 20, arrival=1.0 + i))
    admitted: list[str] = []
    step(sched, admitted)
    assert len(executor.held) == 1  # the waiter's fetch is in flight
    assert admitted == others[:bound]
    for _ in range(3):  # while it stays in flight nobody else goes ahead of the waiter
        step(sched, admitted)
    assert admitted == others[:bound]
    executor.release()
    admitted += run_until_done(sched)
    assert admitted == others[:bound] + ["waiter"] + others[bound:]
    assert sched.kv.prefix_hits == 32  # the fetched blocks were used


def test_waiter_for_room_to_fetch_is_overtaken_at_most_k_times() -> None:
    # 20 blocks; "hog" runs on 14 of them, so the waiter's 8-block fetch has no room; small
    # requests that fit behind it may go first only twice.
    sched = make_scheduler(20, budget=64, max_fetch_overtakes=2)
    executor = FakeExecutor()
    disk = FakeDisk()
    attach_tiers(sched, executor, disk=disk)
    history = tokens(1, 32)
    put_history_on_disk(disk, history)
    sched.add_request(make_request("hog", tokens(900, 52), 4, arrival=0.0))
    step(sched)
    sched.add_request(make_request("waiter", history + [50, 51], 2, arrival=1.0))
    for i in range(4):
        sched.add_request(make_request(f"r{i}", tokens(1000 + 10 * i, 2), 2, arrival=2.0 + i))
    order = run_until_done(sched)
    assert order.index("waiter") == 2, order
    assert order[:2] == ["r0", "r1"]


# ------------------------------------------------------------- 3. cached_by_tier after a fetch


def test_cached_by_tier_counts_only_blocks_reused_after_a_failed_disk_fetch() -> None:
    # 8 blocks of 16 tokens on disk; the second one is corrupt, so it is recomputed (a hole)
    # and the other seven are reused, the six after the hole included.
    sched = make_scheduler(64, block_size=16, budget=512)
    disk = FakeDisk()
    history = tokens(1, 129)
    probe = make_request("probe", history, block_size=16)
    disk.update(probe.block_hashes[:8])
    corrupt = probe.block_hashes[1]

    def fail(item: TransferItem) -> bool:
        if item.src == Tier.DISK and item.key == corrupt:
            disk.discard(item.key)  # the disk tier deletes a file that fails its checksum
            return True
        return False

    executor = FakeExecutor(fail=fail)
    tiers = attach_tiers(sched, executor, disk=disk)
    request = make_request("turn", history + [3, 4, 5], 1, block_size=16, session="s")
    sched.add_request(request)
    for _ in range(3):
        step(sched)
        if request.num_cached_tokens >= 0:
            break
    assert tiers.stats.failed_fetches == 1
    assert request.num_cached_tokens == 7 * 16
    assert request.cached_by_tier == {"device": 0, "host": 0, "disk": 7 * 16}
    assert request.skips == [] and request.num_computed_tokens == len(request.prompt_token_ids)


def test_cached_by_tier_splits_device_host_and_disk_blocks() -> None:
    sched = make_scheduler(64, block_size=4, budget=512)
    disk = FakeDisk()
    executor = FakeExecutor()
    tiers = attach_tiers(sched, executor, host_slots=16, disk=disk)
    history = tokens(1, 24)  # 6 full blocks
    first = make_request("first", history[:-1], 1)
    sched.add_request(first)
    run_until_done(sched)
    probe = make_request("probe", history)
    blocks = [sched.kv.pool.get(key) for key in probe.block_hashes[:5]]
    assert all(b is not None for b in blocks)
    # blocks 0-1 stay on device, 2-3 move to host, 4 to disk only
    tiers.offload_now([b for b in blocks[2:4] if b is not None])
    for block in blocks[2:]:
        assert block is not None
        sched.kv.pool.drop(block)
    disk.add(probe.block_hashes[4])
    request = make_request("turn", history + [1, 2, 3], 1, session="s")
    sched.add_request(request)
    for _ in range(3):
        step(sched)
        if request.num_cached_tokens >= 0:
            break
    assert request.num_cached_tokens == 20
    assert request.cached_by_tier == {"device": 8, "host": 8, "disk": 4}


def test_waiter_whose_device_prefix_is_evicted_meanwhile_fetches_it_from_host() -> None:
    # A session's next turn finds its whole history on the device but no room to run, so it
    # waits. Meanwhile its unreferenced blocks are copied out and evicted. When room comes it
    # must fetch them back from host, not recompute what an earlier turn computed.
    sched = make_scheduler(20, budget=64)
    tiers = attach_tiers(sched, FakeExecutor(), host_slots=64)
    first = make_request("t1", tokens(1, 24), 1, session="s")
    sched.add_request(first)
    run_until_done(sched)
    hog = make_request("hog", tokens(500, 40), 8)
    sched.add_request(hog)
    step(sched)
    assert hog.status == RequestStatus.RUNNING
    history = list(first.all_token_ids)
    second = make_request("t2", history + tokens(900, 12), 4, session="s")
    sched.add_request(second)
    step(sched)
    assert second.status == RequestStatus.WAITING  # no room while "hog" runs
    assert tiers.stats.fetch_jobs == 0  # nothing below the device to fetch yet
    session_blocks = [b for b in sched.kv.pool.cached_free_blocks() if b.block_hash is not None]
    tiers.offload_now(session_blocks)
    for block in session_blocks:
        sched.kv.pool.drop(block)  # evicted under pressure; the host copies remain
    run_until_done(sched)
    assert second.status == RequestStatus.FINISHED_LENGTH
    assert tiers.stats.fetched_blocks["host"] >= 6
    assert second.cached_by_tier["host"] >= 24
    assert second.num_redundant_tokens == 0
    assert sched.kv.pool.num_free_blocks == 20


def test_a_burst_sharing_an_uncached_prefix_computes_it_once() -> None:
    # Three requests with one new 32-token system prompt arrive together. The first computes
    # it; the others wait that one step and reuse it instead of computing it in parallel.
    sched = make_scheduler(64, budget=256)
    system = tokens(1, 32)
    burst = [make_request(f"r{i}", system + tokens(100 * (i + 1), 6), 2) for i in range(3)]
    for request in burst:
        sched.add_request(request)
    first: list[str] = []
    step(sched, first)
    assert first == ["r0"]
    then: list[str] = []
    step(sched, then)
    assert then == ["r1", "r2"]
    assert [r.num_cached_tokens for r in burst] == [0, 32, 32]
    run_until_done(sched)
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in burst)


def test_a_shared_run_shorter_than_the_threshold_does_not_hold_a_request_back() -> None:
    sched = make_scheduler(64, budget=256)
    shared = tokens(1, 4)  # one block in common: not worth a step's wait
    burst = [make_request(f"r{i}", shared + tokens(100 * (i + 1), 12), 2) for i in range(2)]
    for request in burst:
        sched.add_request(request)
    admitted: list[str] = []
    step(sched, admitted)
    assert admitted == ["r0", "r1"]
