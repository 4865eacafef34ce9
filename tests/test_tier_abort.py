"""A request aborted while its KV is being fetched leaks no device block: the fetch lands as
ordinary cached blocks and every block returns to the free pool."""

from __future__ import annotations

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.hashing import hash_seed
from cadenza.core.request import Request, RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import JobKind, TransferJob

BS = 4
NUM_BLOCKS = 32
PROMPT = list(range(1, 26))  # 6 full blocks and one token


class ManualTransfer:
    """Copies succeed; a submitted job finishes only when the test says so."""

    def __init__(self) -> None:
        self.queued: list[TransferJob] = []
        self.done: list[TransferJob] = []

    def submit(self, job: TransferJob) -> None:
        self.queued.append(job)

    def run_now(self, job: TransferJob) -> None:
        self.finish_all()
        self._run(job)

    def finish_all(self) -> None:
        for job in self.queued:
            self._run(job)
            self.done.append(job)
        self.queued = []

    def poll(self) -> list[TransferJob]:
        done, self.done = self.done, []
        return done

    def wait(self, timeout: float) -> list[TransferJob]:
        self.finish_all()
        return self.poll()

    def pending(self) -> int:
        return len(self.queued) + len(self.done)

    @staticmethod
    def _run(job: TransferJob) -> None:
        for item in job.items:
            item.ok = True


def make_request(rid: str, tokens: list[int], max_tokens: int = 2) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        eos_token_ids=(0,),
        block_size=BS,
        hash_seed=hash_seed("m", None),
        max_total_tokens=len(tokens) + max_tokens,
    )


def setup() -> tuple[Scheduler, TierManager, ManualTransfer]:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
        CacheConfig(block_size=BS, admission_reserve_fraction=0.0),
        NUM_BLOCKS,
        clock=lambda: 0.0,
    )
    xfer = ManualTransfer()
    tiers = TierManager(
        sched.kv.pool,
        host_slots=16,
        disk=None,
        executor=xfer,
        policy=sched.kv.pool.policy,
        clock=lambda: 0.0,
    )
    sched.tiers = tiers
    return sched, tiers, xfer


def step(sched: Scheduler) -> None:
    assert sched.tiers is not None
    sched.tiers.poll()
    out = sched.schedule()
    sched.update_from_output(out, {c.request.request_id: 7 for c in out.chunks if c.samples})


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
