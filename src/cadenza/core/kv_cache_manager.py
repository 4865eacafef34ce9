"""Maps requests to KV blocks: prefix lookup, slot allocation, caching of full blocks, freeing."""

from __future__ import annotations

from cadenza.core.block_pool import BlockPool, KVBlock
from cadenza.core.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[KVBlock]] = {}
        # How many of a request's leading blocks are registered in the content index.
        self._num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_of(self, request_id: str) -> list[KVBlock]:
        return self._blocks.get(request_id, [])

    def block_ids_of(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """The longest verified run of cached blocks at the start of the request.

        At least one token is always left to compute, since the step that computes it is the
        one that produces the logits for the next token.
        """
        if not self.enable_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        parent = request.hash_seed
        for i in range(min(max_blocks, len(request.block_hashes))):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            block = self.pool.lookup(request.block_hashes[i], parent, tokens)
            if block is None:
                break
            hits.append(block)
            parent = request.block_hashes[i]
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def _num_new_blocks(
        self, request: Request, num_new_tokens: int, cached: list[KVBlock]
    ) -> tuple[int, int]:
        held = len(self._blocks.get(request.request_id, ())) + len(cached)
        total = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = max(0, -(-total // self.block_size) - held)
        # Cached blocks nobody references sit in the free queue; taking them uses free space.
        revived = sum(1 for b in cached if b.ref_cnt == 0)
        return need, revived

    def can_allocate(
        self,
        request: Request,
        num_new_tokens: int,
        cached: list[KVBlock] | None = None,
        reserve_blocks: int = 0,
    ) -> bool:
        need, revived = self._num_new_blocks(request, num_new_tokens, cached or [])
        return need + revived + reserve_blocks <= self.pool.num_free_blocks

    def allocate(
        self, request: Request, num_new_tokens: int, cached: list[KVBlock] | None = None
    ) -> None:
        """Attach ``cached`` prefix blocks and enough new blocks for ``num_new_tokens`` more
        tokens; check ``can_allocate`` first."""
        cached = cached or []
        need, _ = self._num_new_blocks(request, num_new_tokens, cached)
        if cached:
            self.pool.touch(cached)
        blocks = self._blocks.setdefault(request.request_id, [])
        if not blocks:
            self._num_registered[request.request_id] = len(cached)
        blocks.extend(cached)
        blocks.extend(self.pool.allocate(need))

    def register_full_blocks(self, request: Request) -> None:
        """Index every block whose tokens all have computed KV."""
        if not self.enable_caching:
            return
        blocks = self._blocks.get(request.request_id)
        if not blocks:
            return
        done = self._num_registered[request.request_id]
        full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        for i in range(done, full):
            parent = request.block_hashes[i - 1] if i else request.hash_seed
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            self.pool.register(blocks[i], request.block_hashes[i], parent, tokens)
        self._num_registered[request.request_id] = max(done, full)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its prefix outlives its tail."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_registered.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_index()
