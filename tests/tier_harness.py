"""Helpers for tests that drive the tier manager by hand: a transfer executor whose copies land
only when the test says so, and requests that ignore EOS."""

from __future__ import annotations

from collections.abc import Callable

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.hashing import hash_seed
from cadenza.core.request import Request
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import TransferJob


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


def make_request(rid: str, tokens: list[int], max_tokens: int = 2, block_size: int = 4) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        eos_token_ids=(0,),
        block_size=block_size,
        hash_seed=hash_seed("m", None),
        max_total_tokens=len(tokens) + max_tokens,
    )


def tiered_scheduler(
    num_blocks: int,
    *,
    host_slots: int,
    block_size: int = 4,
    clock: Callable[[], float] = lambda: 0.0,
) -> tuple[Scheduler, TierManager, ManualTransfer]:
    """A scheduler over ``num_blocks`` device blocks with a host tier of ``host_slots`` (no
    disk), its copies done by a ``ManualTransfer``, on ``clock`` (stopped at 0 by default)."""
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
        CacheConfig(block_size=block_size, admission_reserve_fraction=0.0),
        num_blocks,
        clock=clock,
    )
    xfer = ManualTransfer()
    tiers = TierManager(
        sched.kv.pool,
        host_slots=host_slots,
        disk=None,
        executor=xfer,
        policy=sched.kv.pool.policy,
        clock=clock,
    )
    sched.tiers = tiers
    return sched, tiers, xfer


def step(sched: Scheduler) -> None:
    """One scheduling step whose every sample is token 7, after applying landed copies."""
    assert sched.tiers is not None
    sched.tiers.poll()
    out = sched.schedule()
    sched.update_from_output(out, {c.request.request_id: 7 for c in out.chunks if c.samples})
