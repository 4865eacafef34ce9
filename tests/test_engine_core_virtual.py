"""The engine core on a virtual clock: the real scheduler, block pool, tier manager, disk tier
and session logic, driven through ``EngineCore`` by a fake model executor and a transfer
executor that completes copies at virtual times. No sleeps, no wall clock: 200 sessions of 5
turns with think times, TTL pins and tier pressure run in seconds, and every block's content
is checked on every step (the fake model verifies that each request attends exactly its own
tokens, through every offload, spill, fetch and reuse)."""

from __future__ import annotations

import heapq
import random
import struct
from collections import Counter

from cadenza.config import CacheConfig, EngineConfig, SchedulerConfig
from cadenza.core.engine_core import EngineCore, SampledToken, fit_context
from cadenza.core.kv_cache_manager import KVCacheManager
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import SchedulerOutput
from cadenza.core.transfer import Tier, TransferJob
from cadenza.kvstore.disk_tier import DiskTier
from cadenza.session.manager import SessionManager
from cadenza.session.store import ConversationStore

BS = 16
VOCAB = 5000
_PAYLOAD = struct.Struct(f"<B{BS}i")
BYTES_PER_BLOCK = 64 * 1024  # what the virtual links move per block


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """A ``ModelExecutor``: writes each computed token into its KV slot and checks that every
    position the chunk attends holds exactly the request's token there. The sampled token is
    a function of the whole sequence, so outputs never depend on where KV came from."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.slots: dict[int, list[int | None]] = {}
        self.steps = 0

    def bytes_per_block(self) -> int:
        return BYTES_PER_BLOCK

    def execute(self, out: SchedulerOutput, kv: KVCacheManager) -> dict[str, SampledToken]:
        self.steps += 1
        sampled = {}
        for chunk in out.chunks:
            request = chunk.request
            tokens = request.all_token_ids
            table = kv.block_ids_of(request.request_id)
            for start, end in chunk.segments:
                for pos in range(start, end):
                    slot = self.slots.setdefault(table[pos // BS], [None] * BS)
                    slot[pos % BS] = tokens[pos]
            end = chunk.segments[-1][1]
            for pos in range(end):
                held = self.slots.get(table[pos // BS], [None] * BS)[pos % BS]
                assert held == tokens[pos], (
                    f"{request.request_id} attends position {pos}: KV of token {held}, "
                    f"expected {tokens[pos]}"
                )
            if chunk.samples:
                token = (sum(tokens[-4:]) * 31 + len(tokens)) % (VOCAB - 10) + 10
                sampled[request.request_id] = SampledToken(token)
        return sampled


class VirtualLinks:
    """A ``TransferExecutor`` that completes each job at a virtual time (bytes over a link's
    bandwidth, one link per direction, FIFO) and moves real block contents: device slots
    (shared with the fake model), host slots, and a real ``DiskTier``."""

    BANDWIDTH = {"fetch": 8e9, "offload": 8e9, "persist": 2e9}

    def __init__(self, clock: VirtualClock, model: FakeModel, disk: DiskTier) -> None:
        self.clock = clock
        self.model = model
        self.disk = disk
        self.host: dict[int, tuple[int, ...]] = {}
        self.queue: list[tuple[float, int, TransferJob]] = []
        self.link_free_at: dict[str, float] = {}
        self.seq = 0
        self.jobs = Counter()

    def submit(self, job: TransferJob) -> None:
        link = job.kind.value
        start = max(self.clock.now, self.link_free_at.get(link, 0.0))
        done = start + len(job.items) * BYTES_PER_BLOCK / self.BANDWIDTH[link]
        self.link_free_at[link] = done
        self.seq += 1
        heapq.heappush(self.queue, (done, self.seq, job))
        self.jobs[link] += 1

    def run_now(self, job: TransferJob) -> None:
        self._move(job)

    def poll(self) -> list[TransferJob]:
        done = []
        while self.queue and self.queue[0][0] <= self.clock.now:
            job = heapq.heappop(self.queue)[2]
            self._move(job)
            done.append(job)
        return done

    def wait(self, timeout: float) -> list[TransferJob]:
        if self.queue:  # sleep (virtually) until the next job lands, or the timeout
            self.clock.now = max(self.clock.now, min(self.queue[0][0], self.clock.now + timeout))
        return self.poll()

    def pending(self) -> int:
        return len(self.queue)

    def _move(self, job: TransferJob) -> None:
        for item in job.items:
            n = len(item.token_ids)
            if item.src == Tier.DEVICE:
                data = tuple(self.model.slots.get(item.src_slot, [None] * BS)[:n])
            elif item.src == Tier.HOST:
                data = self.host[item.src_slot][:n]
            else:
                raw = self.disk.get(item.key, item.parent, item.token_ids)
                if raw is None:
                    item.ok = False
                    continue
                count, *values = _PAYLOAD.unpack(bytes(raw))
                data = tuple(values[:count])
            assert data == item.token_ids, f"{job.kind} would copy stale KV from {item.src}"
            if item.dst == Tier.DEVICE:
                self.model.slots[item.dst_slot] = list(data) + [None] * (BS - n)
                item.ok = True
            elif item.dst == Tier.HOST:
                self.host[item.dst_slot] = data
                item.ok = True
            else:
                payload = _PAYLOAD.pack(n, *data, *[0] * (BS - n))
                item.ok = self.disk.put(item.key, item.parent, item.token_ids, payload)
            job.bytes_moved += BYTES_PER_BLOCK * item.ok


def check_block_accounting(core: EngineCore) -> None:
    """Every device block's reference count is exactly what holds it: requests, fetched
    blocks waiting for their request, and queued copy jobs; free blocks are the unreferenced."""
    pool = core.scheduler.kv.pool
    tiers = core.tiers
    expected = Counter()
    for blocks in core.scheduler.kv._blocks.values():
        expected.update(b.block_id for b in blocks)
    for blocks in tiers._held.values():
        expected.update(b.block_id for b in blocks)
    for pending in tiers._pending.values():
        expected.update(b.block_id for b in pending.device_blocks)
    for block in pool.blocks:
        assert block.ref_cnt == expected[block.block_id], f"block {block.block_id}"
    assert pool.num_free_blocks == sum(1 for b in pool.blocks if b.ref_cnt == 0)


def build(tmp_path, num_blocks: int = 192, host_slots: int = 256, ttl_cap: float = 0.25):
    clock = VirtualClock()
    model = FakeModel(num_blocks)
    disk = DiskTier(tmp_path / "kv", 4096 * (_PAYLOAD.size + 200))
    links = VirtualLinks(clock, model, disk)
    config = EngineConfig(
        cache=CacheConfig(block_size=BS, num_blocks=num_blocks, kv_pin_cap_fraction=ttl_cap),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16),
    )
    core = EngineCore(
        config,
        model,
        clock=clock,
        fingerprint="virtual-test-model",
        vocab_size=VOCAB,
        eos_token_ids=(1,),
        max_model_len=4096,
        transfer=links,
        host_slots=host_slots,
        disk=disk,
    )
    store = ConversationStore(":memory:", clock=clock)
    return clock, model, links, core, SessionManager(store, None)


class Driver:
    """Sessions arriving and thinking on the virtual clock, turns through the session logic."""

    def __init__(self, clock, core, sessions, rng: random.Random) -> None:
        self.clock, self.core, self.sessions, self.rng = clock, core, sessions, rng
        self.events: list[tuple[float, int, str]] = []
        self.live: dict[str, tuple] = {}
        self.finished: list[dict] = []
        self.seq = 0
        self.steps = 0

    def schedule_turn(self, at: float, session: str) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, session))

    def submit(self, session: str, ttl: float, max_tokens: int) -> str:
        new = [self.rng.randrange(10, VOCAB) for _ in range(self.rng.randint(8, 60))]
        rid = f"{session}/{self.seq}"
        self.seq += 1
        plan = self.sessions.begin_raw_turn(session, new, rid)
        self.core.add_request(
            rid,
            plan.token_ids,
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            session_id=session,
            num_history_tokens=max(plan.num_history_tokens - 1, 0),
            retention_ttl_s=ttl,
        )
        self.live[rid] = (plan, ttl)
        return rid

    def step(self) -> list:
        result = self.core.step()
        self.steps += 1
        finished_at = self.clock.now  # the step's requests finished at this virtual time
        # A step's virtual duration: a fixed cost plus a per-token cost (idle steps that wait
        # for room advance a little too, so time always moves).
        self.clock.now += 0.002 + 2e-5 * result.num_tokens
        done = []
        for request, _ in result.updated:
            if request.is_finished:
                plan, ttl = self.live.pop(request.request_id)
                self.sessions.complete_turn(plan, request.output_token_ids, "", "length")
                record = {
                    "session": plan.session_id,
                    "turn": plan.turn_index,
                    "history": plan.num_history_tokens,
                    "cached": request.num_cached_tokens,
                    "by_tier": dict(request.cached_by_tier),
                    "ttl": ttl,
                    "finished_at": finished_at,
                }
                self.finished.append(record)
                done.append(record)
        if self.steps % 7 == 0:
            check_block_accounting(self.core)
        return done


def test_200_sessions_5_turns_on_a_virtual_clock(tmp_path):
    rng = random.Random(1234)
    clock, model, links, core, sessions = build(tmp_path)
    driver = Driver(clock, core, sessions, rng)
    ttl_of = {f"s{i}": (20.0 if i % 4 == 0 else 0.0) for i in range(200)}
    turns_left = dict.fromkeys(ttl_of, 5)
    for i, session in enumerate(ttl_of):
        driver.schedule_turn(i * 0.5, session)  # arrivals over 100 virtual seconds
    pinned_checks = 0
    while driver.events or core.has_unfinished_requests():
        while driver.events and driver.events[0][0] <= clock.now:
            _, _, session = heapq.heappop(driver.events)
            driver.submit(session, ttl_of[session], rng.randint(4, 24))
        if not core.has_unfinished_requests():
            clock.now = max(clock.now, driver.events[0][0])  # idle: jump to the next arrival
            core.step()  # lets due copies land and the tiers maintain themselves
            continue
        for record in driver.step():
            session = record["session"]
            turns_left[session] -= 1
            if turns_left[session]:
                driver.schedule_turn(clock.now + rng.expovariate(1 / 30.0), session)
            history = sessions.store.history_token_ids(session)
            loc = core.locate_history(history, None)
            until = {b.pin_until for b in loc.device if b is not None and b.pin_until > clock.now}
            if record["ttl"]:
                # Pinned (within the cap) until exactly the finish time plus the TTL.
                assert until <= {record["finished_at"] + record["ttl"]}, (until, record)
                pinned_checks += bool(until)
            else:
                assert not until
    core.flush()
    check_block_accounting(core)
    pool = core.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not core.tiers._held and not core.tiers._pending

    turns = driver.finished
    assert len(turns) == 1000
    later = [t for t in turns if t["turn"] > 0]
    # Every later turn found its whole history cached somewhere (write-through keeps a disk
    # copy of every block), minus at most the partial last block.
    for t in later:
        assert t["cached"] >= t["history"] - BS, t
        assert sum(t["by_tier"].values()) <= t["cached"] + BS
    hits = Counter()
    for t in later:
        for tier, tokens in t["by_tier"].items():
            hits[tier] += tokens > 0
    assert hits["device"] > 0 and hits["host"] > 0 and hits["disk"] > 0, hits
    assert links.jobs["fetch"] > 0 and links.jobs["offload"] > 0 and links.jobs["persist"] > 0
    assert pinned_checks > 0


def test_ttl_pin_holds_until_its_virtual_expiry(tmp_path):
    """A pinned session keeps its KV on the device through pressure until its TTL runs out
    on the virtual clock; after that the same pressure pushes it down a tier."""
    rng = random.Random(7)
    clock, model, links, core, sessions = build(tmp_path, num_blocks=64, host_slots=512)
    driver = Driver(clock, core, sessions, rng)

    def run_turn(session: str, ttl: float = 0.0) -> dict:
        driver.submit(session, ttl, 8)
        while True:
            for record in driver.step():
                if record["session"] == session:
                    while core.has_unfinished_requests():
                        driver.step()
                    return record

    def pressure(tag: str) -> None:
        for i in range(6):  # six other sessions, about two pools' worth of KV
            for _ in range(3):
                run_turn(f"{tag}-{i}")

    for session in ("pinned", "expired"):
        run_turn(session)
        run_turn(session, ttl=20.0)
    finished = sessions.store.get_session("expired")
    assert finished is not None
    t0 = clock.now
    pressure("a")  # inside the TTL
    assert clock.now - t0 < 20.0
    kept = run_turn("pinned")
    assert kept["by_tier"].get("device", 0) >= kept["history"] - BS, kept
    clock.now += 30.0  # past every pin
    core.step()
    assert core.tiers.num_pinned() == 0
    pressure("b")
    moved = run_turn("expired")
    assert moved["cached"] >= moved["history"] - BS
    assert moved["by_tier"].get("device", 0) < moved["history"] - BS, moved
    assert moved["by_tier"].get("host", 0) + moved["by_tier"].get("disk", 0) > 0
    core.flush()
    check_block_accounting(core)


def test_program_fcfs_lets_a_returning_agent_step_go_before_a_new_program():
    """Program-level FCFS (Continuum): with room for one running request, a session's second
    step that arrived later is admitted before another session's first step, because its
    session began first; plain FCFS admits by arrival."""

    def first_admitted(policy: str) -> str:
        config = EngineConfig(
            cache=CacheConfig(block_size=BS, num_blocks=64),
            scheduler=SchedulerConfig(max_num_seqs=1, policy=policy),
            kv_cost_model="linear",
        )
        clock = VirtualClock()
        core = EngineCore(
            config,
            FakeModel(64),
            clock=clock,
            fingerprint="virtual-test-model",
            vocab_size=VOCAB,
            eos_token_ids=(1,),
            max_model_len=1024,
        )
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        core.add_request("old-1", list(range(10, 30)), one, session_id="old")
        while core.has_unfinished_requests():
            clock.now += 0.1
            core.step()
        clock.now = 10.0
        core.add_request("new-1", list(range(40, 60)), one, session_id="new")
        clock.now = 11.0
        core.add_request("old-2", list(range(10, 40)), one, session_id="old")
        result = core.step()
        (request, _), *_ = result.updated
        return request.request_id

    assert first_admitted("program") == "old-2"
    assert first_admitted("fcfs") == "new-1"


def test_a_turn_continues_in_its_partial_tail_while_the_write_through_still_reads_it(tmp_path):
    """A session's next turn that arrives while the previous turn's write-through to disk is
    still queued continues in the partial tail block that copy reads (it reads only the
    tail's first tokens, which the turn leaves alone): nothing recomputed, the copy lands
    intact (``VirtualLinks`` checks every copied slot), and the accounting balances."""
    rng = random.Random(11)
    clock, model, links, core, sessions = build(tmp_path, num_blocks=256, host_slots=256)
    links.BANDWIDTH = {**links.BANDWIDTH, "persist": 1e6}  # a slow disk: ~0.2 s per turn
    driver = Driver(clock, core, sessions, rng)
    records = []
    for _ in range(4):
        driver.submit("agent", 0.0, 5)  # back to back: the next turn right after the last
        while core.has_unfinished_requests():
            records.extend(driver.step())
        assert core.tiers.num_pending_jobs, "the write-through should still be in flight"
    later = records[1:]
    assert all(r["history"] % BS for r in later), "each history should end in a partial tail"
    for record in later:
        # The whole history, the partial tail included, from the device (the last sampled
        # token never had KV computed: history - 1 is all there is).
        assert record["cached"] == record["history"] - 1, record
        assert record["by_tier"]["device"] == record["cached"], record
    core.flush()
    check_block_accounting(core)
    assert links.jobs["persist"] >= 4
    assert core.tiers.stats.persisted_blocks > 0


def test_a_pool_shorter_than_the_context_is_reported_once_per_shape(caplog):
    config = EngineConfig(cache=CacheConfig(block_size=16))
    with caplog.at_level("WARNING", logger="cadenza.engine"):
        assert [fit_context(config, 8192, 37) for _ in range(3)] == [592] * 3
        assert fit_context(config, 8192, 38) == 608  # another shape: its own warning
    warnings = [r.getMessage() for r in caplog.records if "less than the model's" in r.message]
    assert len(warnings) == 2 and "592 tokens (37 blocks)" in warnings[0]
