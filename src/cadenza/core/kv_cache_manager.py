"""Maps requests to KV blocks: prefix lookup across tiers, slot allocation, caching of full
blocks, freeing.

A returning request's context is ``[dropped | lower tier | device | new]`` (Pensieve): the
leading blocks may have been evicted while later ones survived, because eviction drops a
conversation's leading chunks first. ``locate_prefix`` finds the first run of blocks that are
still held somewhere; the leading hole before it is recomputed in the same pass as the new tokens
(the request's counter skips over the run), and lower-tier blocks are fetched before admission.
The device pool and the host tier rank their blocks apart, so a chain can also lose a block in
the middle; admission asks for the runs after such a hole too (``later_runs``), recomputes every
hole and reuses every run, instead of recomputing all that follows the first hole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cadenza.core.block_pool import BlockPool, KVBlock
from cadenza.core.eviction import EvictionPolicy
from cadenza.core.hashing import hash_block
from cadenza.core.request import Request
from cadenza.core.transfer import Tier


class TierLocator(Protocol):
    """What the manager asks about tiers below the device (``TierManager`` implements it)."""

    def locate(self, key: bytes, parent: bytes, token_ids: list[int]) -> Tier | None: ...

    def has_lower_copy(self, key: bytes) -> bool: ...

    def num_readers(self, block: KVBlock) -> int: ...


@dataclass
class CachedRun:
    """Blocks ``[start, start + len(tiers))`` of a request, held in ``tiers`` (device blocks in
    ``device``, ``None`` where not on the device)."""

    start: int
    tiers: list[Tier] = field(default_factory=list)
    device: list[KVBlock | None] = field(default_factory=list)


@dataclass
class PrefixLocation:
    """Where a request's cached prefix lives: blocks ``[0, leading)`` are gone (recompute),
    blocks ``[leading, leading + len(tiers))`` are held in ``tiers`` (device blocks in
    ``device``, ``None`` where not on the device). ``later``: the runs held after further
    holes, when asked for."""

    leading: int = 0
    tiers: list[Tier] = field(default_factory=list)
    device: list[KVBlock | None] = field(default_factory=list)
    later: list[CachedRun] = field(default_factory=list)

    def runs(self) -> list[CachedRun]:
        """Every located run in order: the first one, then the later ones."""
        return [CachedRun(self.leading, self.tiers, self.device), *self.later]

    def device_blocks(self) -> list[KVBlock]:
        """Every device block of every run."""
        return [b for run in self.runs() for b in run.device if b is not None]

    @property
    def num_blocks(self) -> int:
        return len(self.tiers)

    def count(self, tier: Tier) -> int:
        return sum(1 for t in self.tiers if t == tier)

    @property
    def all_on_device(self) -> bool:
        return all(t == Tier.DEVICE for t in self.tiers)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        policy: EvictionPolicy | None = None,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, policy, clock=clock)
        self._blocks: dict[str, list[KVBlock]] = {}
        # How many of a request's leading blocks are registered in the content index.
        self._num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up at admission
        self.prefix_hits = 0  # of those, found cached in any tier

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_of(self, request_id: str) -> list[KVBlock]:
        return self._blocks.get(request_id, [])

    def num_slots(self, request: Request) -> int:
        """Token slots the request's blocks hold."""
        blocks = self._blocks.get(request.request_id)
        return len(blocks) * self.block_size if blocks else 0

    def block_ids_of(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def _block_tokens(self, request: Request, i: int) -> list[int]:
        return request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]

    def locate_prefix(
        self, request: Request, lower: TierLocator | None = None, *, later_runs: bool = False
    ) -> PrefixLocation:
        """The first run of the request's blocks held in any tier, after any leading hole, and
        with ``later_runs`` the runs held after further holes.

        At least one token is always left to compute, since the step that computes it is the
        one that produces the logits for the next token.
        """
        loc = PrefixLocation()
        if not self.enable_caching:
            return loc
        max_blocks = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        run: CachedRun | None = None  # the later run being extended
        hashes, pool = request.block_hashes, self.pool
        for i in range(max_blocks):
            key = hashes[i]
            # Most misses (a turn's new blocks) are known by key alone: verify only a key held.
            if pool.get(key) is None and (lower is None or not lower.has_lower_copy(key)):
                tier, block = None, None
            else:
                parent = hashes[i - 1] if i else request.hash_seed
                tokens = self._block_tokens(request, i)
                block = pool.lookup(key, parent, tokens)
                tier = Tier.DEVICE if block is not None else None
                if tier is None and lower is not None:
                    tier = lower.locate(key, parent, tokens)
            if tier is None:
                if loc.tiers and not later_runs:
                    break
                if not loc.tiers:
                    loc.leading = i + 1
                run = None
                continue
            if not loc.tiers or (run is None and loc.leading + len(loc.tiers) == i):
                loc.tiers.append(tier)
                loc.device.append(block)
                continue
            if run is None:
                run = CachedRun(i)
                loc.later.append(run)
            run.tiers.append(tier)
            run.device.append(block)
        if not loc.tiers:
            loc.leading = 0
        return loc

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """The longest verified run of device blocks at the very start of the request."""
        loc = self.locate_prefix(request)
        hits: list[KVBlock] = []
        if loc.leading == 0:
            for block in loc.device:
                if block is None:
                    break
                hits.append(block)
        return hits

    def lower_tier_blocks(
        self, request: Request, loc: PrefixLocation
    ) -> list[tuple[bytes, bytes, tuple[int, ...], int, Tier]]:
        """``(key, parent, tokens, position, tier)`` of the located runs' blocks that sit below
        the device: what a fetch must copy up."""
        size = self.block_size
        out = []
        for run in loc.runs():
            for offset, tier in enumerate(run.tiers):
                if tier != Tier.DEVICE:
                    i = run.start + offset
                    parent = request.block_hashes[i - 1] if i else request.hash_seed
                    tokens = tuple(request.all_token_ids[i * size : (i + 1) * size])
                    out.append((request.block_hashes[i], parent, tokens, i * size, tier))
        return out

    def blocks_to_fetch(
        self, request: Request, loc: PrefixLocation, locator: TierLocator
    ) -> list[tuple[bytes, bytes, tuple[int, ...], int, Tier]]:
        """What a fetch for ``request`` must copy up: the located run's lower-tier blocks, plus
        the session's partial tail block when it sits below the device (left out, the turn
        would wait for a second one-block fetch)."""
        wanted = self.lower_tier_blocks(request, loc)
        whole = loc.leading == 0 and not loc.later
        if whole and self.find_tail(request, loc.num_blocks, tiers=locator) is None:
            address = self.tail_address(request, loc.num_blocks)
            tier = locator.locate(*address[:3]) if address is not None else None
            if address is not None and tier is not None:
                wanted.append((*address, tier))
        return wanted

    def find_tail(
        self,
        request: Request,
        num_full: int,
        held: list[KVBlock] | None = None,
        tiers: TierLocator | None = None,
    ) -> KVBlock | None:
        """A session's partially filled last block from its previous turn, if it is still on
        the device, unreferenced, and holds exactly the tokens that follow ``num_full`` full
        blocks (so the turn continues in it instead of recomputing up to 15 tokens)."""
        address = self.tail_address(request, num_full)
        if address is None:
            return None
        block = self.pool.lookup(*address[:3])
        if block is None:
            return None
        # Nobody else may be using it: unreferenced, held only for this request, or read by
        # queued copies (the write-through to disk of the turn that just finished, usually).
        # A copy reads only the block's first tokens, which the turn leaves as they are.
        mine = sum(1 for b in held or () if b is block)
        readers = tiers.num_readers(block) if tiers is not None else 0
        return block if block.ref_cnt == mine + readers else None

    def tail_address(
        self, request: Request, num_full: int
    ) -> tuple[bytes, bytes, tuple[int, ...], int] | None:
        """``(key, parent, tokens, position)`` of the partial tail after ``num_full`` blocks."""
        size = self.block_size
        tail = request.num_history_tokens - num_full * size
        if not self.enable_caching or not 0 < tail < size:
            return None
        parent = request.block_hashes[num_full - 1] if num_full else request.hash_seed
        tokens = tuple(request.all_token_ids[num_full * size : num_full * size + tail])
        return hash_block(parent, tokens), parent, tokens, num_full * size

    def register_tail(self, request: Request) -> None:
        """Index the request's partially filled last block under a partial-block key (a hash
        over fewer tokens can never match a full block), for the session's next turn."""
        blocks = self._blocks.get(request.request_id)
        size = self.block_size
        num_full, tail = divmod(request.num_computed_tokens, size)
        if not self.enable_caching or not blocks or not tail or num_full >= len(blocks):
            return
        block = blocks[num_full]
        if block.block_hash is not None:
            return
        parent = request.block_hashes[num_full - 1] if num_full else request.hash_seed
        tokens = request.all_token_ids[num_full * size : num_full * size + tail]
        self.pool.register(block, hash_block(parent, tokens), parent, tokens, num_full * size)

    def _num_new_blocks(
        self, request: Request, end: int, layout: list[KVBlock | None]
    ) -> tuple[int, int]:
        """Fresh blocks needed so tokens ``[0, end)`` have slots, and cached blocks revived."""
        held = len(self._blocks.get(request.request_id, ()))
        total = -(-end // self.block_size)
        if held:
            need = total - held if total > held else 0
        else:
            holes = sum(1 for b in layout if b is None)
            need = holes + max(0, total - len(layout))
        if not layout:
            return need, 0  # a running request's next chunk (most calls)
        # Cached blocks nobody references sit in the free queue; taking them uses free space.
        revived = sum(1 for b in layout if b is not None and b.ref_cnt == 0)
        return need, revived

    def can_allocate(
        self,
        request: Request,
        end: int,
        layout: list[KVBlock | None] | None = None,
        reserve_blocks: int = 0,
    ) -> bool:
        """Whether slots for tokens ``[0, end)`` fit, for a request not yet holding blocks laid
        out as ``layout`` (its leading blocks: a cached block, or None for a fresh one that
        recomputes a hole; fresh ones follow)."""
        need, revived = self._num_new_blocks(request, end, layout or [])
        return need + revived + reserve_blocks <= self.pool.num_free_blocks

    def allocate(
        self,
        request: Request,
        end: int,
        layout: list[KVBlock | None] | None = None,
        tail: KVBlock | None = None,
    ) -> None:
        """Give the request slots for tokens ``[0, end)``: its leading blocks as ``layout``
        says (cached ones reused, fresh ones where it has None), an adopted partial ``tail``
        after them, then fresh ones; check ``can_allocate`` first (with the tail counted in
        the layout)."""
        if not layout and tail is None:
            blocks = self._blocks.get(request.request_id)
            if blocks and -(-end // self.block_size) <= len(blocks):
                return  # a running request whose slots already cover ``end`` (most decodes)
        placed = list(layout or [])
        holes = any(b is None for b in placed)
        num_full = len(placed)
        if tail is not None:
            placed.append(tail)
        need, _ = self._num_new_blocks(request, end, placed)
        cached = [b for b in placed if b is not None]
        if cached:
            self.pool.touch(cached)
        if tail is not None:
            self.pool.unregister(tail)  # its content grows from here on
        fresh = iter(self.pool.allocate(need))
        blocks = self._blocks.setdefault(request.request_id, [])
        if not blocks:
            self._num_registered[request.request_id] = 0 if holes else num_full
            blocks.extend(b if b is not None else next(fresh) for b in placed)
        blocks.extend(fresh)

    def register_full_blocks(self, request: Request) -> list[KVBlock]:
        """Index every block whose tokens all have computed KV; returns the newly indexed."""
        if not self.enable_caching:
            return []
        blocks = self._blocks.get(request.request_id)
        if not blocks:
            return []
        done = self._num_registered[request.request_id]
        full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        if full <= done:
            return []  # no block filled up since the last call (most decode steps)
        added = []
        for i in range(done, full):
            parent = request.block_hashes[i - 1] if i else request.hash_seed
            tokens = self._block_tokens(request, i)
            key = request.block_hashes[i]
            if self.pool.register(blocks[i], key, parent, tokens, i * self.block_size):
                added.append(blocks[i])
        self._num_registered[request.request_id] = max(done, full)
        return added

    def free(self, request: Request) -> list[KVBlock]:
        """Release the request's blocks, tail first, so its prefix outlives its tail; returns
        them in sequence order."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_registered.pop(request.request_id, None)
        self.pool.free(reversed(blocks))
        return blocks

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_index()
