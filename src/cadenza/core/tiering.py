"""Where a KV block lives below the device, and when it moves (Pensieve, FastSwitch).

Torch-free bookkeeping for the host and disk tiers. The device tier is the engine's
``BlockPool``; the host tier is a fixed number of RAM slots indexed by block key; the disk tier is
a directory of content-addressed files (``kvstore.disk_tier``). The tier manager decides:

* **fetch** — a returning turn (or a hint) whose blocks are on host or disk gets fresh device
  blocks, and one job copies them in; the turn waits for it, then finds device hits;
* **ahead-of-time offload** — when fewer than 25% of device blocks are empty, the lowest-valued
  cached blocks without a lower copy are copied to host in the background, no more than the host
  has slots not holding a copy of such a block already, and not again after a copy that only
  evicted such copies until the device's blocks change; the device copy stays usable until its
  block is reallocated (lazy reclaim);
* **swap preemption** — a preempted request's blocks are copied out before they are freed;
* **persist** — finished turns are written through to disk, and host entries evicted to make
  room are spilled there, so a block leaves the hierarchy only when the disk is full too;
* **pins** — retention TTLs and hints pin device blocks, capped at a fraction of the pool.

A block whose host copy is still valid is never copied out again: everything is keyed by content.

KV events: host entries added and evicted, and the disk tier's changes, go to the block pool's
event log (``pool.events``) next to its device events, so a router can index all three tiers
from one ordered stream. The disk tier changes on the copy thread (writes, its own capacity
evictions), so it journals its changes (``DiskJournal``) and they are pulled into the log on the
engine thread whenever the log is drained; ``emit_disk_snapshot`` announces the files a
restarted worker found on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from cadenza.core.block_pool import BlockPool, KVBlock
from cadenza.core.eviction import EvictionPolicy
from cadenza.core.eviction_index import EvictionIndex, supports
from cadenza.core.hashing import BlockHash
from cadenza.core.kv_events import KVEventLog
from cadenza.core.transfer import JobKind, Tier, TransferExecutor, TransferItem, TransferJob


class DiskIndex(Protocol):
    def __contains__(self, key: BlockHash) -> bool: ...


@runtime_checkable
class DiskJournal(Protocol):
    """A disk index that can list its keys and journal its changes (``DiskTier`` does); only
    such a disk is reported in KV events."""

    def __contains__(self, key: BlockHash) -> bool: ...

    def keys(self) -> list[bytes]: ...

    def track_changes(self) -> None: ...

    def drain_changes(self) -> list[tuple[bytes, bool]]: ...


@dataclass(eq=False, slots=True)
class HostEntry:
    key: BlockHash
    parent: BlockHash
    token_ids: tuple[int, ...]
    slot: int
    position: int
    num_tokens: int
    last_access: float
    pin_until: float = 0.0
    busy: int = 0  # queued jobs reading this slot


class HostIndex:
    """Host RAM slots by block key, evicted by the same policy as the device pool.

    ``entries`` is changed only through ``add`` and ``reserve``, and an entry's ``busy`` count
    only through ``acquire`` / ``unacquire``: an index of the idle entries ranks them for
    eviction without a scan, and ``on_change`` (the tier manager's) hears of every key added
    or evicted."""

    def __init__(
        self, num_slots: int, policy: EvictionPolicy, events: KVEventLog | None = None
    ) -> None:
        self.num_slots = num_slots
        self.policy = policy
        self.events = events
        self.entries: dict[BlockHash, HostEntry] = {}
        self._free_slots = list(range(num_slots - 1, -1, -1))
        # Each entry's place in ``entries`` (insertion order), and the idle ones ranked.
        self._seq: dict[HostEntry, int] = {}
        self._next_seq = 0
        self._idle: EvictionIndex[HostEntry] | None = (
            EvictionIndex(policy) if supports(policy) else None
        )
        self.on_change: Callable[[list[BlockHash], bool], None] | None = None

    def __contains__(self, key: BlockHash) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(
        self, key: BlockHash, parent: BlockHash, token_ids: Sequence[int]
    ) -> HostEntry | None:
        entry = self.entries.get(key)
        if entry is None or entry.parent != parent or entry.token_ids != tuple(token_ids):
            return None
        return entry

    def reserve(self, n: int) -> tuple[list[int], list[HostEntry]]:
        """Up to ``n`` slots, evicting idle entries by policy; returns the slots and the entries
        evicted from them (the caller spills those before overwriting)."""
        slots = [self._free_slots.pop() for _ in range(min(n, len(self._free_slots)))]
        evicted: list[HostEntry] = []
        if len(slots) < n:
            k = n - len(slots)
            chosen = self._idle.choose(k) if self._idle is not None else None
            if chosen is None:
                idle = (e for e in self.entries.values() if e.busy == 0)
                chosen = self.policy.choose(idle, k)
            for entry in chosen:
                del self.entries[entry.key]
                del self._seq[entry]
                evicted.append(entry)
                slots.append(entry.slot)
            if evicted:
                if self._idle is not None:
                    self._idle.remove_many(evicted)
                if self.on_change is not None:
                    self.on_change([e.key for e in evicted], False)
                if self.events is not None:
                    self.events.emit_removed([e.key for e in evicted], Tier.HOST)
        return slots, evicted

    def take_free(self, n: int) -> list[int]:
        """Up to ``n`` empty slots, evicting nothing (the caller fills them, then ``add``s or
        ``release``s each)."""
        return [self._free_slots.pop() for _ in range(min(n, len(self._free_slots)))]

    def add(self, entry: HostEntry) -> bool:
        """Index a filled slot; False (nothing changes) if the key is already held, in which
        case the caller releases the slot."""
        return self.add_many([entry])[0]

    def add_many(self, entries: Sequence[HostEntry]) -> list[bool]:
        """``add`` each entry in turn; returns whether each was added."""
        added: list[HostEntry] = []
        result = []
        held = self.entries
        for entry in entries:
            if entry.key in held:
                result.append(False)
                continue
            held[entry.key] = entry
            self._seq[entry] = self._next_seq
            self._next_seq += 1
            added.append(entry)
            result.append(True)
        if added:
            if self._idle is not None:
                idle = [e for e in added if e.busy == 0]
                self._idle.add_many(idle, [self._seq[e] for e in idle])
            keys = [e.key for e in added]
            if self.on_change is not None:
                self.on_change(keys, True)
            if self.events is not None:
                self.events.emit_stored(keys, Tier.HOST)
        return result

    def acquire(self, entry: HostEntry) -> None:
        """A queued job reads this entry's slot: it cannot be evicted until ``unacquire``."""
        entry.busy += 1
        if entry.busy == 1 and self._idle is not None:
            self._idle.remove(entry)

    def unacquire(self, entry: HostEntry) -> None:
        entry.busy -= 1
        if entry.busy == 0 and self._idle is not None and self.entries.get(entry.key) is entry:
            self._idle.add(entry, self._seq[entry])

    def release(self, slot: int) -> None:
        self._free_slots.append(slot)


@dataclass
class TierStats:
    fetch_jobs: int = 0
    fetched_blocks: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    failed_fetches: int = 0
    offloaded_blocks: int = 0
    persisted_blocks: int = 0
    swap_in_bytes: int = 0
    swap_in_seconds: float = 0.0
    swap_out_bytes: int = 0
    swap_out_seconds: float = 0.0
    disk_write_bytes: int = 0
    disk_write_seconds: float = 0.0
    dropped_blocks: int = 0  # evicted from device with no lower copy: recompute if needed


@dataclass
class _Pending:
    job: TransferJob
    device_blocks: list[KVBlock]
    host_entries: list[HostEntry]
    host_slots: list[int]
    # Cached free device blocks whose host copy was evicted to make room for this job's copies.
    uncovered: int = 0


class TierManager:
    def __init__(
        self,
        pool: BlockPool,
        *,
        host_slots: int,
        disk: DiskIndex | None,
        executor: TransferExecutor,
        policy: EvictionPolicy,
        clock: Callable[[], float],
        aot_threshold: float = 0.25,
        pin_cap_fraction: float = 0.20,
        write_through: bool = True,
        max_job_blocks: int = 256,
    ) -> None:
        self.pool = pool
        self.events = pool.events
        self.host = HostIndex(host_slots, policy, self.events) if host_slots > 0 else None
        self.disk = disk
        self.executor = executor
        self.policy = policy
        self.clock = clock
        self.aot_threshold = aot_threshold
        self.pin_cap = int(pool.num_blocks * pin_cap_fraction)
        self.write_through = write_through and disk is not None
        self.max_job_blocks = max_job_blocks
        self.stats = TierStats()
        self._pending: dict[int, _Pending] = {}
        # Fetched device blocks held for the request that waits for them, until it is admitted.
        self._held: dict[str, list[KVBlock]] = {}
        # The fetch each owner waits for, by job id. An owner released meanwhile (an aborted
        # request) is dropped from here; its fetch then lands as ordinary cached blocks.
        self._fetching: dict[str, int] = {}
        self._offload_in_flight = 0
        # The device's (empty, cached free) block counts when an ahead-of-time copy gained
        # nothing (it evicted as many host copies of cached free device blocks as it made): no
        # new try until they change, so an engine with nothing else to do stops copying.
        self._futile_offload_at: tuple[int, int] | None = None
        # How many queued copy-out jobs read each device block (by id): references that only
        # read the block's first tokens, so a session may continue in a partial tail they hold.
        self._readers: dict[int, int] = {}
        # Cached free device blocks without a host copy (the ahead-of-time copy's candidates),
        # ranked for eviction without a scan; kept in step with the pool's free queue and the
        # host tier's keys.
        self._uncopied: EvictionIndex[KVBlock] | None = None
        if self.host is not None and supports(policy):
            self._uncopied = EvictionIndex(policy)
            for block in pool.cached_free_blocks():
                if block.block_hash not in self.host:
                    self._uncopied.add(block, pool.free_seq(block))
            pool.free_listeners.append(self)
            self.host.on_change = self._host_key_changed
        pool.before_evict = self.offload_now
        pool.on_evict = self._on_device_evict
        self._journal = disk if isinstance(disk, DiskJournal) else None
        if self._journal is not None:
            self._journal.track_changes()
            self.events.add_drain_hook(self._collect_disk_events)

    # ------------------------------------------------------------------------- lookup
    def locate(self, key: BlockHash, parent: BlockHash, token_ids: Sequence[int]) -> Tier | None:
        """The fastest tier below the device holding this block, if any."""
        if self.host is not None and self.host.lookup(key, parent, token_ids) is not None:
            return Tier.HOST
        if self.disk is not None and key in self.disk:
            return Tier.DISK  # verified against parent and tokens when the file is read
        return None

    def has_host_copy(self, key: BlockHash) -> bool:
        """Whether copying this block out would be redundant: it is on host already, or (with
        no host tier) on disk already."""
        if self.host is not None:
            return key in self.host
        return self.disk is not None and key in self.disk

    def has_lower_copy(self, key: BlockHash) -> bool:
        return (self.host is not None and key in self.host) or (
            self.disk is not None and key in self.disk
        )

    def num_readers(self, block: KVBlock) -> int:
        """References on ``block`` held by queued copies that read it out (to host or disk)."""
        return self._readers.get(block.block_id, 0)

    def is_fetching(self, owner: str) -> bool:
        return owner in self._fetching

    @property
    def num_pending_jobs(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------------- fetch
    def fetch(
        self,
        owner: str,
        wanted: Sequence[tuple[BlockHash, BlockHash, tuple[int, ...], int, Tier]],
        *,
        pin_until: float = 0.0,
    ) -> TransferJob | None:
        """Copy ``(key, parent, tokens, position, tier)`` blocks to fresh device blocks; the caller
        checked that the pool can give ``len(wanted)`` blocks."""
        if not wanted:
            return None
        # Take the host sources first: allocating device blocks may evict, eviction copies
        # out to host, and a full host evicts its idle entries, possibly the ones wanted here.
        busy: list[HostEntry] = []
        slots: list[int] = []
        for key, _, _, _, tier in wanted:
            slot = -1
            if tier == Tier.HOST:
                assert self.host is not None
                entry = self.host.entries[key]
                self.host.acquire(entry)
                busy.append(entry)
                slot = entry.slot
            slots.append(slot)
        blocks = self.pool.allocate(len(wanted))
        items: list[TransferItem] = []
        for (key, parent, tokens, position, tier), slot, block in zip(
            wanted, slots, blocks, strict=True
        ):
            items.append(
                TransferItem(key, parent, tokens, position, tier, slot, Tier.DEVICE, block.block_id)
            )
        job = TransferJob(JobKind.FETCH, items, owner=owner, pin_until=pin_until)
        self._pending[job.job_id] = _Pending(job, blocks, busy, [])
        self._fetching[owner] = job.job_id
        self.stats.fetch_jobs += 1
        self.executor.submit(job)
        return job

    def hold(self, owner: str, blocks: list[KVBlock]) -> None:
        """Take references on device blocks on ``owner``'s behalf until it is admitted."""
        self.pool.touch(blocks)
        self._held.setdefault(owner, []).extend(blocks)

    def held(self, owner: str) -> list[KVBlock]:
        return self._held.get(owner, [])

    def take_held(self, owner: str) -> list[KVBlock]:
        """Blocks fetched for ``owner``; the caller now owns their references."""
        return self._held.pop(owner, [])

    def release_held(self, owner: str) -> None:
        """Let go of everything kept for ``owner``: the blocks held now, and a fetch still in
        flight, whose blocks become ordinary (unreferenced) cached blocks when it lands. Called
        when the owner is admitted (nothing in flight then) and when it finishes or is
        aborted, so an abort during a fetch leaks no device block."""
        self._fetching.pop(owner, None)
        self.pool.free(self.take_held(owner), accessed=False)

    # ---------------------------------------------------------------------- copies out
    def maintain(self) -> None:
        """Ahead-of-time offload when the device runs short of empty blocks."""
        if self.host is None or self._offload_in_flight:
            return
        pool = self.pool
        target = int(self.aot_threshold * pool.num_blocks)
        if pool.num_empty_blocks >= target:
            return
        state = (pool.num_empty_blocks, pool.num_cached_free_blocks)
        if state == self._futile_offload_at:
            return
        self._futile_offload_at = None
        chosen = self._aot_candidates(target)
        if not chosen:
            return
        job = self._copy_out(chosen, JobKind.OFFLOAD, count_uncovered=True)
        if job is not None:
            pending = self._pending[job.job_id]
            if pending.uncovered >= len(pending.device_blocks):
                self._futile_offload_at = state
            self._offload_in_flight += 1
            self.executor.submit(job)

    def _aot_candidates(self, target: int) -> list[KVBlock]:
        """The cached free blocks without a host copy to copy out now, if enough blocks
        without one are short of ``target`` empty-or-copied blocks."""
        pool = self.pool
        index = self._uncopied
        if index is not None:
            # Every cached free block is registered (movable); those not in the index have
            # a host copy.
            covered = pool.num_cached_free_blocks - len(index)
            shortfall = target - pool.num_empty_blocks - covered
            # Host slots not holding a copy of a cached free block: a copy beyond them would
            # evict the copy of another such block and gain nothing.
            room = self._host_room(covered)
            if shortfall <= 0 or room <= 0:
                return []
            n = min(shortfall, self.max_job_blocks, room)
            chosen = index.choose(n)
            if chosen is not None:
                return chosen
            uncopied = [b for b in pool.cached_free_blocks() if b in index]
            return self.policy.choose(uncopied, n)
        candidates = [b for b in pool.cached_free_blocks() if self._movable(b)]
        covered = sum(1 for b in candidates if self.has_host_copy(b.block_hash))  # type: ignore[arg-type]
        shortfall = target - pool.num_empty_blocks - covered
        room = self._host_room(covered)
        if shortfall <= 0 or room <= 0:
            return []
        uncopied = [b for b in candidates if not self.has_host_copy(b.block_hash)]  # type: ignore[arg-type]
        return self.policy.choose(uncopied, min(shortfall, self.max_job_blocks, room))

    def _host_room(self, covered: int) -> int:
        """How many more cached free device blocks the host could cover: its slots less the
        ``covered`` ones already holding such a block's copy. A host smaller than the offload
        target fills up with copies of blocks the device still holds; copying another block
        then evicts one of those copies, and the copies would chase each other forever."""
        assert self.host is not None
        return self.host.num_slots - covered

    # The pool's free queue and the host tier's keys, mirrored into ``_uncopied``.
    def cached_free_added(self, blocks: list[KVBlock], seqs: Sequence[int]) -> None:
        assert self._uncopied is not None and self.host is not None
        entries = self.host.entries
        pairs = [(b, s) for b, s in zip(blocks, seqs, strict=True) if b.block_hash not in entries]
        if pairs:
            self._uncopied.add_many([b for b, _ in pairs], [s for _, s in pairs])

    def cached_free_removed(self, blocks: list[KVBlock]) -> None:
        assert self._uncopied is not None
        self._uncopied.remove_many(blocks)

    def cached_free_updated(self, block: KVBlock) -> None:
        assert self._uncopied is not None
        self._uncopied.update(block)

    def _host_key_changed(self, keys: list[BlockHash], present: bool) -> None:
        index, pool = self._uncopied, self.pool
        assert index is not None
        blocks = pool.cached_free_holding(keys)
        if present:
            index.remove_many(blocks)
            return
        blocks = [b for b in blocks if b not in index]
        # Back among the copy-out candidates, in their place in the free queue.
        blocks.sort(key=pool.free_seq)
        index.add_many(blocks, [pool.free_seq(b) for b in blocks])

    def offload_now(self, blocks: Iterable[KVBlock]) -> None:
        """Copy registered blocks without a lower copy out, synchronously: for swap preemption,
        and for eviction when the ahead-of-time copy has not kept up."""
        chosen = [b for b in blocks if self._movable(b) and not self.has_host_copy(b.block_hash)]  # type: ignore[arg-type]
        if self.host is None and self.disk is None:
            return
        kind = JobKind.OFFLOAD if self.host is not None else JobKind.PERSIST
        job = self._copy_out(chosen, kind)
        if job is not None:
            job.owner = "preempt"
            self.executor.run_now(job)
            self._apply(job)

    def persist(self, blocks: Iterable[KVBlock]) -> None:
        """Write-through: registered blocks not yet on disk go there in the background."""
        if not self.write_through:
            return
        assert self.disk is not None
        chosen = [b for b in blocks if self._movable(b) and b.block_hash not in self.disk]
        for start in range(0, len(chosen), self.max_job_blocks):
            job = self._copy_out(chosen[start : start + self.max_job_blocks], JobKind.PERSIST)
            if job is not None:
                self.executor.submit(job)

    def _copy_out(
        self, blocks: list[KVBlock], kind: JobKind, *, count_uncovered: bool = False
    ) -> TransferJob | None:
        """A job copying ``blocks`` out (to host for an offload, evicting host entries as
        needed, or to disk). ``count_uncovered``: count the evicted host entries that held a
        cached free device block's copy (``_Pending.uncovered``; only the ahead-of-time
        offload reads it)."""
        if not blocks or (kind == JobKind.OFFLOAD and self.host is None):
            return None
        items: list[TransferItem] = []
        busy: list[HostEntry] = []
        slots: list[int] = []
        uncovered = 0
        if kind == JobKind.OFFLOAD:
            assert self.host is not None
            slots, evicted = self.host.reserve(len(blocks))
            blocks = blocks[: len(slots)]
            if evicted and count_uncovered:
                uncovered = len(self.pool.cached_free_holding([e.key for e in evicted]))
            for entry in evicted:
                if self.disk is not None and entry.key not in self.disk:
                    # Spill first: the same job overwrites this slot right after.
                    items.append(self._item(entry, Tier.HOST, entry.slot, Tier.DISK, -1))
                else:
                    self.stats.dropped_blocks += self.disk is None
        device = Tier.DEVICE
        if kind == JobKind.OFFLOAD:
            dst_slots: Sequence[int] = slots
            dst = Tier.HOST
        else:
            dst_slots, dst = [-1] * len(blocks), Tier.DISK
        for block, slot in zip(blocks, dst_slots, strict=True):
            key, parent, tokens = block.block_hash, block.parent_hash, block.token_ids
            assert key is not None and parent is not None and tokens is not None
            items.append(
                TransferItem(key, parent, tokens, block.position, device, block.block_id, dst, slot)
            )
        if not items:
            return None
        self.pool.touch(blocks)
        readers = self._readers
        for block in blocks:
            readers[block.block_id] = readers.get(block.block_id, 0) + 1
        job = TransferJob(kind, items)
        self._pending[job.job_id] = _Pending(job, list(blocks), busy, slots, uncovered)
        return job

    def _movable(self, block: KVBlock) -> bool:
        """Registered blocks move between tiers (a session's partial tail included)."""
        return block.block_hash is not None

    @staticmethod
    def _item(
        src_obj: KVBlock | HostEntry, src: Tier, src_slot: int, dst: Tier, dst_slot: int
    ) -> TransferItem:
        if isinstance(src_obj, KVBlock):
            key, parent, tokens = src_obj.block_hash, src_obj.parent_hash, src_obj.token_ids
        else:
            key, parent, tokens = src_obj.key, src_obj.parent, src_obj.token_ids
        assert key is not None and parent is not None and tokens is not None
        return TransferItem(key, parent, tokens, src_obj.position, src, src_slot, dst, dst_slot)

    # ----------------------------------------------------------------------- completion
    def poll(self, wait_s: float = 0.0) -> list[TransferJob]:
        """Apply finished jobs (waiting up to ``wait_s`` for one); returns them."""
        done = self.executor.wait(wait_s) if wait_s > 0 else self.executor.poll()
        for job in done:
            self._apply(job)
        return done

    def _apply(self, job: TransferJob) -> None:
        pending = self._pending.pop(job.job_id, None)
        if pending is None:
            return
        for entry in pending.host_entries:
            assert self.host is not None
            self.host.unacquire(entry)
        if job.kind == JobKind.FETCH:
            self._apply_fetch(job, pending.device_blocks)
            return
        by_block = {b.block_id: b for b in pending.device_blocks}
        used_slots = set()
        landed: list[tuple[TransferItem, HostEntry | None]] = []
        for item in job.items:
            if item.dst == Tier.DISK:
                self.stats.persisted_blocks += item.ok
                continue
            used_slots.add(item.dst_slot)
            block = by_block[item.src_slot]
            entry = None
            if item.ok:
                # The item's own position and length: a session may have continued in a
                # partial tail since (the block now holds more tokens under no key).
                entry = HostEntry(
                    item.key,
                    item.parent,
                    item.token_ids,
                    item.dst_slot,
                    item.position,
                    len(item.token_ids),
                    block.last_access,
                )
            landed.append((item, entry))
        if self.host is not None:
            # Two jobs may copy the same block (an ahead-of-time copy still in flight when a
            # preemption copies it again); the first copy to land is kept.
            added = iter(self.host.add_many([e for _, e in landed if e is not None]))
            for item, entry in landed:
                if entry is not None and next(added):
                    self.stats.offloaded_blocks += 1
                else:
                    self.host.release(item.dst_slot)
            for slot in pending.host_slots:
                if slot not in used_slots:
                    self.host.release(slot)
        if job.kind == JobKind.OFFLOAD:
            self._offload_in_flight = max(0, self._offload_in_flight - (job.owner is None))
            self.stats.swap_out_bytes += job.bytes_moved
            self.stats.swap_out_seconds += job.seconds
        else:
            self.stats.disk_write_bytes += job.bytes_moved
            self.stats.disk_write_seconds += job.seconds
        readers = self._readers
        for block in pending.device_blocks:
            left = readers[block.block_id] - 1
            if left:
                readers[block.block_id] = left
            else:
                del readers[block.block_id]
        self.pool.free(pending.device_blocks, accessed=False)

    def _apply_fetch(self, job: TransferJob, blocks: list[KVBlock]) -> None:
        owner = job.owner or ""
        awaited = self._fetching.get(owner) == job.job_id
        if awaited:
            del self._fetching[owner]
        self.stats.swap_in_bytes += job.bytes_moved
        self.stats.swap_in_seconds += job.seconds
        kept: list[KVBlock] = []
        unused: list[KVBlock] = []
        now = self.clock()
        for item, block in zip(job.items, blocks, strict=True):
            if item.ok and self.pool.register(
                block, item.key, item.parent, item.token_ids, item.position
            ):
                self.stats.fetched_blocks[item.src.value] += 1
                block.last_access = now
                kept.append(block)
            else:
                self.stats.failed_fetches += not item.ok
                unused.append(block)
        self.pool.free(unused, accessed=False)
        if not awaited:
            self.pool.free(kept, accessed=False)  # its owner is gone: plain cached blocks
        elif owner.startswith("hint:"):
            self.pool.free(kept, accessed=False)
            self.pin(kept, job.pin_until)
        else:
            self._held.setdefault(owner, []).extend(kept)

    # ----------------------------------------------------------------------- KV events
    def emit_disk_snapshot(self) -> int:
        """Announce the disk tier's whole content: ``AllCleared(DISK)`` then one
        ``BlockStored(DISK)`` with every key present. The engine calls it once at start, so a
        restarted worker rejoins with the blocks it left on disk; calling it again later is a
        harmless resync. Returns the number of keys announced (0 without a journaling disk)."""
        if self._journal is None:
            return 0
        self._collect_disk_events()  # changes so far come first; the snapshot supersedes them
        keys = self._journal.keys()
        self.events.emit_cleared(Tier.DISK)
        self.events.emit_stored(keys, Tier.DISK)
        return len(keys)

    def _collect_disk_events(self) -> None:
        """Move the disk tier's journaled changes into the event log, in order (the log
        coalesces runs of the same kind)."""
        assert self._journal is not None
        for key, present in self._journal.drain_changes():
            if present:
                self.events.emit_stored((key,), Tier.DISK)
            else:
                self.events.emit_removed((key,), Tier.DISK)

    def _on_device_evict(self, block: KVBlock) -> None:
        if block.block_hash is not None and not self.has_lower_copy(block.block_hash):
            self.stats.dropped_blocks += 1

    # ------------------------------------------------------------------------- pins
    def num_pinned(self) -> int:
        now = self.clock()
        return sum(1 for b in self.pool.blocks if b.pin_until > now and b.block_hash is not None)

    def pin(self, blocks: Sequence[KVBlock], until: float) -> int:
        """Pin device blocks until ``until``, latest blocks first, within the cap; returns how
        many are pinned."""
        now = self.clock()
        room = self.pin_cap - self.num_pinned()
        pinned = 0
        for block in reversed(blocks):
            if block.block_hash is None:
                continue
            if block.pin_until > now:
                self.pool.set_pin_until(block, max(block.pin_until, until))
                pinned += 1
            elif room > 0:
                self.pool.set_pin_until(block, until)
                room -= 1
                pinned += 1
        return pinned
