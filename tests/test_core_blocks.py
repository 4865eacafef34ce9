"""Block pool, hashing and KV cache manager: exact block-level behaviour, no torch."""

import subprocess
import sys

import pytest

from cadenza.core.block_pool import BlockPool
from cadenza.core.hashing import extend_block_hashes, hash_block, hash_seed
from cadenza.core.kv_cache_manager import KVCacheManager
from cadenza.core.request import Request
from cadenza.core.sampling_params import SamplingParams

SEED = hash_seed("model-a", None)


def make_request(rid: str, tokens: list[int], salt: str | None = None, block_size: int = 4):
    return Request(
        request_id=rid,
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=8),
        eos_token_ids=(0,),
        block_size=block_size,
        hash_seed=hash_seed("model-a", salt),
        max_total_tokens=1000,
    )


def test_hash_is_deterministic_across_processes():
    code = (
        "from cadenza.core.hashing import hash_block, hash_seed;"
        "print(hash_block(hash_seed('model-a', 'salt'), [1, 2, 3, 4]).hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == hash_block(hash_seed("model-a", "salt"), [1, 2, 3, 4]).hex()


def test_hash_chain_depends_on_prefix_model_and_salt():
    a: list[bytes] = []
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, SEED)
    assert len(a) == 2  # the partial third block has no key
    b: list[bytes] = []
    extend_block_hashes(b, [9, 2, 3, 4, 5, 6, 7, 8], 4, SEED)
    assert a[1] != b[1]  # same block tokens, different prefix
    assert hash_block(hash_seed("model-b", None), [1, 2, 3, 4]) != a[0]
    assert hash_block(hash_seed("model-a", "tenant"), [1, 2, 3, 4]) != a[0]


def test_pool_lru_lazy_eviction_and_verification():
    pool = BlockPool(3, clock=lambda: 0.0)
    blocks = pool.allocate(3)
    pool.register(blocks[0], b"k0", SEED, (1, 2))
    pool.register(blocks[1], b"k1", b"k0", (3, 4))
    assert not pool.can_allocate(1)
    pool.free([blocks[1], blocks[0], blocks[2]])
    assert pool.num_free_blocks == 3
    # Still findable while free; wrong tokens or parent never match.
    assert pool.lookup(b"k0", SEED, (1, 2)) is blocks[0]
    assert pool.lookup(b"k0", SEED, (1, 9)) is None
    assert pool.lookup(b"k1", b"zz", (3, 4)) is None
    # Empty blocks go first; then cached ones are evicted in free order: the tail first.
    (empty,) = pool.allocate(1)
    assert empty is blocks[2]
    assert pool.lookup(b"k1", b"k0", (3, 4)) is blocks[1]
    (first,) = pool.allocate(1)
    assert first is blocks[1]
    assert pool.lookup(b"k1", b"k0", (3, 4)) is None
    assert pool.lookup(b"k0", SEED, (1, 2)) is blocks[0]
    pool.touch([blocks[0]])
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 0


def test_pool_refuses_double_free():
    pool = BlockPool(1, clock=lambda: 0.0)
    block = pool.allocate(1)[0]
    pool.free([block])
    with pytest.raises(RuntimeError):
        pool.free([block])


def test_manager_prefix_hit_shares_blocks_and_keeps_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4, clock=lambda: 0.0)
    first = make_request("a", list(range(1, 13)))  # 3 full blocks
    assert kv.find_cached_prefix(first) == []
    kv.allocate(first, 12)
    first.num_computed_tokens = 12
    kv.register_full_blocks(first)
    second = make_request("b", list(range(1, 13)))
    hits = kv.find_cached_prefix(second)
    assert len(hits) == 2  # the last block holds the token that must be recomputed
    assert kv.can_allocate(second, 12, hits)
    kv.allocate(second, 12, hits)
    assert kv.blocks_of("b")[:2] == kv.blocks_of("a")[:2]
    assert all(b.ref_cnt == 2 for b in kv.blocks_of("a")[:2])
    salted = make_request("c", list(range(1, 13)), salt="other-tenant")
    assert kv.find_cached_prefix(salted) == []


def test_manager_accounting_returns_every_block():
    kv = KVCacheManager(num_blocks=12, block_size=4, clock=lambda: 0.0)
    reqs = [make_request(str(i), list(range(i, i + 9))) for i in range(3)]
    for r in reqs:
        kv.allocate(r, 9)
        r.num_computed_tokens = 9
        kv.register_full_blocks(r)
    assert kv.pool.num_free_blocks == 12 - 9
    assert kv.pool.num_cached_blocks == 6
    for r in reqs:
        kv.free(r)
    assert kv.pool.num_free_blocks == 12
    assert kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 0
