"""Priority among pinned KV (SYMPHONY's cooperative memory management): the eviction order gives
up the KV whose pin runs longest first, and an import takes room only from empty blocks,
unpinned cached KV and KV pinned for later than its own grace, never from KV pinned to be
needed sooner (a hinted turn due in seconds)."""

from __future__ import annotations

import pytest
from tests.conftest import TINY_LLAMA, EvictableEntry

from cadenza import LLM, SamplingParams
from cadenza.core.engine_core import HINT_GRACE_S
from cadenza.core.eviction import CostAwareEviction, CostModel, LRUEviction
from cadenza.core.hashing import hash_block, hash_seed
from cadenza.model.source import random_model_source

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


Entry = EvictableEntry


@pytest.mark.parametrize("kind", ["lru", "cost"])
def test_unpinned_go_first_then_the_pin_that_runs_longest(kind):
    now = 100.0
    policy = (
        LRUEviction(lambda: now)
        if kind == "lru"
        else CostAwareEviction(lambda: now, CostModel.linear())
    )
    soon = Entry(0, 16, last_access=1.0, pin_until=now + 5)  # oldest, but needed in 5 s
    later = Entry(0, 16, last_access=90.0, pin_until=now + 50)
    expired = Entry(0, 16, last_access=99.0, pin_until=now - 1)  # a pin that lapsed
    plain = Entry(0, 16, last_access=98.0)
    order = policy.choose([soon, later, expired, plain], 4)
    assert order[2:] == [later, soon]
    assert set(order[:2]) == {expired, plain}


@pytest.fixture(scope="module")
def tiny_source():
    return random_model_source(TINY_LLAMA, seed=5)


def _cached_blocks(llm: LLM, tokens: list[int]) -> int:
    """How many of the leading full blocks of ``tokens`` the device still holds."""
    core = llm.engine.core
    pool, size = core.scheduler.kv.pool, core.scheduler.kv.block_size
    parent, held = hash_seed(core.fingerprint, None), 0
    for i in range(len(tokens) // size):
        chunk = tokens[i * size : (i + 1) * size]
        key = hash_block(parent, chunk)
        if pool.lookup(key, parent, chunk) is None:
            break
        held, parent = held + 1, key
    return held


@pytest.mark.parametrize("pin_for_s", [5.0, 10 * HINT_GRACE_S])
def test_an_import_spares_kv_pinned_to_be_needed_sooner(tiny_source, pin_for_s):
    mine = [11 + (i * 13) % 300 for i in range(100)]
    theirs = [17 + (i * 19) % 300 for i in range(100)]
    small = {
        "num_kv_blocks": 48,
        "host_num_blocks": 0,
        "admission_reserve_fraction": 0.0,
        "kv_pin_cap_fraction": 1.0,
    }
    with (
        LLM(source=tiny_source, block_size=4, kv_cost_model="linear") as a,
        LLM(source=tiny_source, block_size=4, kv_cost_model="linear", **small) as b,
    ):
        (out,) = a.generate([theirs], GREEDY)
        export = a.engine.export_kv("theirs", theirs + out.outputs[0].token_ids)
        (mine_out,) = b.generate([mine], GREEDY)
        my_history = mine + mine_out.outputs[0].token_ids
        held = _cached_blocks(b, my_history)
        assert held >= 25
        tiers = b.engine.core.tiers
        pool = b.engine.core.scheduler.kv.pool
        mine_blocks = [blk for blk in pool.cached_free_blocks() if blk.block_hash is not None]
        assert tiers.pin(mine_blocks, tiers.clock() + pin_for_s) == len(mine_blocks)
        result = b.import_kv(export)
        installed = result.installed_by_tier["device"]
        if pin_for_s < HINT_GRACE_S:
            # My turn is due before theirs: the import is cut to the room left around my KV.
            assert _cached_blocks(b, my_history) == held
            assert installed == 48 - len(mine_blocks) < len(export.blocks)
        else:
            # Mine is needed later than theirs would be: theirs takes what it needs.
            assert installed == len(export.blocks)
            assert _cached_blocks(b, my_history) < held
