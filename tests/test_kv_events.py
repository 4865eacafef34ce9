"""KV events: a router's index rebuilt from the event stream alone equals the engine's own
holdings on every tier, after every operation of a long random run on the real scheduler, tier
manager and disk tier (with a fake copy executor that really moves block contents)."""

from __future__ import annotations

import pickle
import random
import struct
from collections.abc import Callable

import pytest

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.block_pool import BlockPool
from cadenza.core.hashing import hash_seed
from cadenza.core.kv_events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVEventLog,
    apply_events,
)
from cadenza.core.request import Request, RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import Tier, TransferJob
from cadenza.kvstore.disk_tier import DiskTier, header_size

BS = 4
SEED = hash_seed("kv-events-test", None)
_PAYLOAD = struct.Struct(f"<B{BS}i")
FILE_BYTES = header_size(BS) + _PAYLOAD.size  # a disk file of a full block
COUNTED = ("turns", "resets", "failed_steps", "aborted_mid_fetch", "hints")


def encode(tokens: tuple[int, ...]) -> bytes:
    return _PAYLOAD.pack(len(tokens), *tokens, *[0] * (BS - len(tokens)))


def decode(payload: bytes | bytearray) -> tuple[int, ...]:
    n, *tokens = _PAYLOAD.unpack(bytes(payload))
    return tuple(tokens[:n])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTransfer:
    """A ``TransferExecutor`` over dicts (device block id -> the tokens whose KV it holds, host
    slot -> the same) and a real ``DiskTier``. A submitted job runs, and is handed back, after
    a random number of polls (0: at the next one), so jobs finish in any order; ``run_now``
    first runs every queued job, as the swap engine does. Every copy checks that its source
    holds the tokens the item names."""

    def __init__(self, disk: DiskTier | None, rng: random.Random, max_delay: int = 3) -> None:
        self.device: dict[int, tuple[int, ...]] = {}
        self.host: dict[int, tuple[int, ...]] = {}
        self.disk = disk
        self.rng = rng
        self.max_delay = max_delay
        self.queued: list[tuple[int, TransferJob]] = []  # (polls left, job)
        self.done: list[TransferJob] = []
        self.moved = 0

    def submit(self, job: TransferJob) -> None:
        self.queued.append((self.rng.randint(0, self.max_delay), job))

    def run_now(self, job: TransferJob) -> None:
        self._run_all_queued()
        self._run(job)

    def poll(self) -> list[TransferJob]:
        waiting = []
        ready = []
        for left, job in self.queued:
            if left <= 0:
                ready.append(job)
            else:
                waiting.append((left - 1, job))
        self.queued = waiting
        self.rng.shuffle(ready)
        for job in ready:
            self._run(job)
            self.done.append(job)
        done, self.done = self.done, []
        return done

    def wait(self, timeout: float) -> list[TransferJob]:
        self._run_all_queued()
        return self.poll()

    def pending(self) -> int:
        return len(self.queued) + len(self.done)

    def _run_all_queued(self) -> None:
        queued, self.queued = self.queued, []
        for _, job in queued:
            self._run(job)
            self.done.append(job)

    def _run(self, job: TransferJob) -> None:
        for item in job.items:
            if item.src == Tier.DEVICE:
                # The block's first tokens: a session may have continued in a partial tail
                # this copy reads (it reads what the item names; the rest is not its KV).
                data: tuple[int, ...] | None = self.device[item.src_slot][: len(item.token_ids)]
            elif item.src == Tier.HOST:
                data = self.host[item.src_slot]
            else:
                assert self.disk is not None
                raw = self.disk.get(item.key, item.parent, item.token_ids)
                data = None if raw is None else decode(raw)
            if data is None:  # a disk miss (evicted meanwhile): the copy fails
                item.ok = False
                continue
            assert data == item.token_ids, f"{job.kind} copied stale content from {item.src}"
            if item.dst == Tier.DEVICE:
                self.device[item.dst_slot] = data
                item.ok = True
            elif item.dst == Tier.HOST:
                self.host[item.dst_slot] = data
                item.ok = True
            else:
                assert self.disk is not None
                item.ok = self.disk.put(item.key, item.parent, item.token_ids, encode(data))
            self.moved += item.ok
            job.bytes_moved += _PAYLOAD.size * item.ok


class Worker:
    """One worker: the real scheduler and tier manager over a fake model and copy executor,
    plus a router's view of it rebuilt from its events only."""

    def __init__(self, disk_dir, rng: random.Random, clock: FakeClock) -> None:
        self.rng = rng
        self.clock = clock
        self.sched = Scheduler(
            SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=6),
            CacheConfig(block_size=BS, admission_reserve_fraction=0.05),
            32,
            clock=clock,
        )
        self.pool = self.sched.kv.pool
        self.disk = DiskTier(disk_dir, 24 * FILE_BYTES)
        self.xfer = FakeTransfer(self.disk, rng)
        self.tiers = TierManager(
            self.pool,
            host_slots=10,
            disk=self.disk,
            executor=self.xfer,
            policy=self.pool.policy,
            clock=clock,
        )
        self.sched.tiers = self.tiers
        self.index: dict[Tier, set[bytes]] = {tier: set() for tier in Tier}
        self.counts: dict[str, int] = {}

    # -------------------------------------------------------------------- the model
    def step(self) -> list[Request]:
        """One engine step; returns the requests that finished."""
        self.tiers.poll()
        out = self.sched.schedule()
        if out.is_empty:
            self.tiers.maintain()
            return []
        self._compute(out)
        sampled = {c.request.request_id: self.rng.randint(1, 40) for c in out.chunks}
        updated = self.sched.update_from_output(out, sampled)
        self.tiers.maintain()
        return [r for r in updated if r.is_finished]

    def _compute(self, out) -> None:
        """Write the KV of the scheduled tokens into their blocks: each block holds the tokens
        whose KV it has, and a chunk may only continue a block that holds its prefix."""
        for chunk in out.chunks:
            request = chunk.request
            blocks = self.sched.kv.blocks_of(request.request_id)
            tokens = request.all_token_ids
            for start, end in chunk.segments:
                pos = start
                while pos < end:
                    i = pos // BS
                    block_end = min(end, (i + 1) * BS)
                    bid = blocks[i].block_id
                    have = self.xfer.device.get(bid, ())[: pos - i * BS]
                    assert have == tuple(tokens[i * BS : pos]), "computing on wrong KV"
                    self.xfer.device[bid] = have + tuple(tokens[pos:block_end])
                    pos = block_end

    def flush(self) -> None:
        while self.tiers.num_pending_jobs:
            self.tiers.poll(wait_s=1.0)

    # -------------------------------------------------------------------- the checks
    def check(self) -> None:
        apply_events(self.index, self.pool.events.drain())
        assert self.index[Tier.DEVICE] == set(self.pool.cached_keys())
        assert self.tiers.host is not None
        assert self.index[Tier.HOST] == set(self.tiers.host.entries)
        assert self.index[Tier.DISK] == set(self.disk.keys())
        # The copies are real: every indexed block holds the tokens it is indexed under.
        for key in self.pool.cached_keys():
            block = self.pool.get(key)
            assert block is not None
            assert self.xfer.device.get(block.block_id) == block.token_ids
        for entry in self.tiers.host.entries.values():
            assert self.xfer.host.get(entry.slot) == entry.token_ids
        assert self.pool.num_free_blocks <= self.pool.num_blocks


def make_request(
    rid: str,
    tokens: list[int],
    max_tokens: int,
    *,
    session_id: str | None = None,
    num_history: int = 0,
    ttl: float = 0.0,
    arrival: float = 0.0,
) -> Request:
    request = Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        eos_token_ids=(0,),
        block_size=BS,
        hash_seed=SEED,
        max_total_tokens=len(tokens) + max_tokens,
        arrival_time=arrival,
    )
    request.session_id = session_id
    request.num_history_tokens = num_history
    request.retention_ttl_s = ttl
    return request


def run_random_ops(
    worker: Worker,
    rng: random.Random,
    clock: FakeClock,
    sessions: dict[str, list[int]],
    num_ops: int,
    ids: Callable[[], int],
) -> None:
    """Random session turns, steps, aborts (mid-fetch too), failed steps, hints and resets on
    ``worker``, checking the rebuilt index after each operation."""
    system = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # a prefix every session shares
    active: dict[str, str] = {}  # session -> request id
    sched, tiers = worker.sched, worker.tiers
    ops = ["turn"] * 30 + ["step"] * 45 + ["abort"] * 6 + ["poll"] * 8 + ["hint"] * 5
    ops += ["failed_step"] * 2 + ["reset"] * 2 + ["oneshot"] * 2
    for _ in range(num_ops):
        op = rng.choice(ops)
        clock.now += rng.choice([0.01, 0.1, 1.0, 20.0])
        if op == "turn":
            idle = [s for s in sessions if s not in active]
            if idle:
                sid = rng.choice(idle)
                history = sessions[sid]
                if len(history) > 70:  # a fresh conversation under the same name
                    history = sessions[sid] = []
                prompt = (history or list(system)) + [
                    rng.randint(1, 40) for _ in range(rng.randint(1, 9))
                ]
                rid = f"r{ids()}"
                sched.add_request(
                    make_request(
                        rid,
                        prompt,
                        rng.randint(1, 6),
                        session_id=sid,
                        num_history=max(len(history) - 1, 0),
                        ttl=rng.choice([0.0, 0.0, 5.0]),
                        arrival=clock.now,
                    )
                )
                active[sid] = rid
                worker.counts["turns"] = worker.counts.get("turns", 0) + 1
        elif op == "oneshot":  # no session: shares the system prompt only
            prompt = list(system) + [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
            sched.add_request(make_request(f"o{ids()}", prompt, rng.randint(1, 4)))
        elif op == "step":
            for request in worker.step():
                sid = request.session_id
                if sid is not None and active.get(sid) == request.request_id:
                    sessions[sid] = list(request.all_token_ids)
                    del active[sid]
        elif op == "failed_step":  # the model raised: the engine aborts everything
            tiers.poll()
            sched.schedule()
            for rid in list(sched.requests):
                sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            active.clear()
            worker.counts["failed_steps"] = worker.counts.get("failed_steps", 0) + 1
        elif op == "abort" and sched.requests:
            fetching = [r for r in sched.requests if tiers.is_fetching(r)]
            rid = rng.choice(fetching if fetching and rng.random() < 0.7 else list(sched.requests))
            if tiers.is_fetching(rid):
                worker.counts["aborted_mid_fetch"] = worker.counts.get("aborted_mid_fetch", 0) + 1
            sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            assert not tiers.is_fetching(rid)
            for sid, r in list(active.items()):
                if r == rid:
                    del active[sid]
        elif op == "poll":
            tiers.poll()
        elif op == "hint":
            idle = [s for s in sessions if s not in active and len(sessions[s]) >= 2]
            if idle:
                hint(worker, rng.choice(idle), sessions, clock)
        elif op == "reset" and not sched.has_unfinished_requests():
            worker.flush()
            assert sched.kv.reset_prefix_cache()
            worker.counts["resets"] = worker.counts.get("resets", 0) + 1
        worker.check()


def hint(worker: Worker, sid: str, sessions: dict[str, list[int]], clock: FakeClock) -> None:
    """What the engine does on a hint: fetch the session's lower-tier blocks, pinned."""
    history = sessions[sid]
    probe = make_request(f"hint:{sid}", history, 1, num_history=len(history) - 1)
    kv, tiers = worker.sched.kv, worker.tiers
    loc = kv.locate_prefix(probe, tiers)
    if tiers.is_fetching(probe.request_id):
        return
    wanted = kv.blocks_to_fetch(probe, loc, tiers)
    room = kv.pool.num_free_blocks - worker.sched.reserve_blocks
    if tiers.fetch(probe.request_id, wanted[: max(room, 0)], pin_until=clock.now + 30.0):
        worker.counts["hints"] = worker.counts.get("hints", 0) + 1


def drain_worker(worker: Worker) -> None:
    """Abort everything, land every copy: every device block is free again."""
    for rid in list(worker.sched.requests):
        worker.sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    worker.flush()
    worker.check()
    assert worker.pool.num_free_blocks == worker.pool.num_blocks
    assert not worker.tiers._held
    assert not worker.tiers._fetching


@pytest.mark.parametrize("seed", [0, 1])
def test_router_index_from_events_matches_every_tier(tmp_path, seed):
    rng = random.Random(seed)
    clock = FakeClock()
    counter = iter(range(10**9))
    ids = counter.__next__
    sessions: dict[str, list[int]] = {f"s{i}": [] for i in range(8)}

    worker = Worker(tmp_path / "disk", rng, clock)
    assert worker.tiers.emit_disk_snapshot() == 0
    worker.check()
    run_random_ops(worker, rng, clock, sessions, 700, ids)
    drain_worker(worker)
    first = worker

    # A restart: the new worker rejoins with the files its disk tier holds, and a router that
    # starts from nothing learns them from the start-up snapshot.
    on_disk = set(first.disk.keys())
    assert on_disk
    worker = Worker(tmp_path / "disk", rng, clock)
    assert worker.tiers.emit_disk_snapshot() == len(on_disk)
    worker.check()
    assert worker.index[Tier.DISK] == on_disk
    run_random_ops(worker, rng, clock, sessions, 500, ids)
    drain_worker(worker)

    # The run exercised what it is meant to (sums over both workers).
    counts = {k: first.counts.get(k, 0) + worker.counts.get(k, 0) for k in COUNTED}
    stats = [first.tiers.stats, worker.tiers.stats]
    assert counts["turns"] > 150 and counts["resets"] > 0 and counts["failed_steps"] > 0
    assert counts["aborted_mid_fetch"] > 0 and counts["hints"] > 0
    assert sum(s.fetched_blocks["host"] for s in stats) > 0
    assert sum(s.fetched_blocks["disk"] for s in stats) > 0
    assert worker.tiers.stats.fetched_blocks["disk"] > 0  # the restarted worker used its disk
    assert sum(s.offloaded_blocks for s in stats) > 0
    assert first.sched.num_preemptions + worker.sched.num_preemptions > 0
    assert first.disk.stats.num_evictions + worker.disk.stats.num_evictions > 0


def test_events_are_picklable_and_coalesced_in_order():
    log = KVEventLog()
    log.emit_stored([b"a"], Tier.DEVICE)
    log.emit_stored([b"b", b"c"], Tier.DEVICE)
    log.emit_stored([b"x"], Tier.HOST)
    log.emit_removed([], Tier.HOST)  # nothing: no event
    log.emit_removed([b"a"], Tier.DEVICE)
    log.emit_cleared(Tier.DISK)
    log.emit_cleared(Tier.DISK)
    log.emit_stored([b"d"], Tier.DISK)
    events = log.drain()
    assert events == [
        BlockStored((b"a", b"b", b"c"), Tier.DEVICE),
        BlockStored((b"x",), Tier.HOST),
        BlockRemoved((b"a",), Tier.DEVICE),
        AllCleared(Tier.DISK),
        BlockStored((b"d",), Tier.DISK),
    ]
    assert pickle.loads(pickle.dumps(events)) == events
    assert log.drain() == []
    index: dict[Tier, set[bytes]] = {Tier.DISK: {b"old"}}
    apply_events(index, events)
    assert index == {Tier.DEVICE: {b"b", b"c"}, Tier.HOST: {b"x"}, Tier.DISK: {b"d"}}
    with pytest.raises(AttributeError):
        events[0].keys = ()  # type: ignore[misc]


def test_block_pool_reports_its_content_index():
    pool = BlockPool(3, clock=lambda: 0.0)
    index: dict[Tier, set[bytes]] = {}

    def check() -> None:
        apply_events(index, pool.events.drain())
        assert index.get(Tier.DEVICE, set()) == set(pool.cached_keys())

    a, b, c = pool.allocate(3)
    assert pool.register(a, b"k0", SEED, (1,))
    assert pool.register(b, b"k1", b"k0", (2,))
    assert not pool.register(c, b"k1", b"k0", (2,))  # a key already indexed: no event
    check()
    assert set(pool.cached_keys()) == {b"k0", b"k1"}
    pool.unregister(b)  # its owner is about to change its content
    check()
    assert pool.reset_index() is False  # blocks still referenced: nothing changes
    check()
    pool.free([a, b, c])
    pool.allocate(3)  # the two empty blocks, then k0's block is reallocated
    check()
    assert pool.cached_keys() == []
    pool.free([a, b, c])
    assert pool.register(a, b"k2", SEED, (3,))  # unreferenced: cached at once
    pool.drop(a)
    check()
    assert pool.register(b, b"k3", SEED, (4,))
    assert pool.reset_index()
    events = pool.events.drain()
    assert events[-1] == AllCleared(Tier.DEVICE)
    apply_events(index, events)
    assert index[Tier.DEVICE] == set() == set(pool.cached_keys())
