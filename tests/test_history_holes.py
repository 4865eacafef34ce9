"""A history that lost blocks in the middle: every hole is recomputed, every run after it reused.

The device pool and the host tier evict by their own rankings, so a conversation's chain can
lose a block in the middle while blocks after it survive. A turn over such a history must give
the same tokens as a cold recompute, compute only the holes (and its new tokens), and reuse the
held runs wherever they are: on the device, or on host (fetched first).
"""

from __future__ import annotations

import pytest
from tests.conftest import TINY_LLAMA

from cadenza import LLM, SamplingParams
from cadenza.model.source import random_model_source

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BLOCK = 16
FIRST = [11 + (i * 37) % 300 for i in range(150)]
NEW = [3 + (i * 41) % 300 for i in range(20)]


def _second_prompt(llm: LLM) -> list[int]:
    (out,) = llm.generate([FIRST], GREEDY)
    return FIRST + out.outputs[0].token_ids + NEW


def _blocks_by_index(llm: LLM) -> dict[int, object]:
    pool = llm.engine.scheduler.kv.pool
    return {b.position // BLOCK: b for b in pool.cached_free_blocks() if b.block_hash is not None}


@pytest.fixture(scope="module")
def tiny_source():
    return random_model_source(TINY_LLAMA, seed=11)


@pytest.fixture(scope="module")
def reference(tiny_source) -> tuple[list[int], list[int]]:
    """The second turn's prompt and its tokens, computed cold."""
    with LLM(source=tiny_source, enable_prefix_caching=False, num_kv_blocks=64) as llm:
        prompt = _second_prompt(llm)
        (out,) = llm.generate([prompt], GREEDY)
    return prompt, out.outputs[0].token_ids


@pytest.mark.parametrize("budget", [512, 24])  # 24: holes recomputed over several steps
def test_device_runs_after_two_holes_are_reused(tiny_source, reference, budget):
    prompt, expected = reference
    with LLM(
        source=tiny_source, num_kv_blocks=64, host_num_blocks=0, max_num_batched_tokens=budget
    ) as llm:
        assert _second_prompt(llm) == prompt
        blocks = _blocks_by_index(llm)
        assert set(range(9)) <= set(blocks)  # 150 + 6 tokens: 9 full blocks
        pool = llm.engine.scheduler.kv.pool
        for i in (0, 3, 4, 6):  # holes: [0], [3, 4], [6]; runs: [1, 2], [5], [7, 8]
            pool.drop(blocks[i])
        (out,) = llm.generate([prompt], GREEDY)
    assert out.outputs[0].token_ids == expected
    held = 5 * BLOCK
    assert out.num_cached_tokens == held
    assert out.cached_tokens_by_tier["device"] == held  # the first run alone would be 32


def _host_run_between_holes(llm: LLM, prompt: list[int]) -> dict[int, object]:
    """After the first turn: runs [0, 1] and [7, 8] on the device, [3, 5] only on host,
    holes [2] and [6]. Returns the first turn's blocks by index."""
    assert _second_prompt(llm) == prompt
    blocks = _blocks_by_index(llm)
    llm.engine.core.tiers.offload_now([blocks[i] for i in (3, 4, 5)])
    for i in (2, 3, 4, 5, 6):
        llm.engine.scheduler.kv.pool.drop(blocks[i])
    assert all(blocks[i].block_hash is None for i in (3, 4, 5))
    return blocks


def test_a_host_run_after_a_hole_is_fetched_and_reused(tiny_source, reference):
    prompt, expected = reference
    with LLM(source=tiny_source, num_kv_blocks=64, host_num_blocks=64) as llm:
        _host_run_between_holes(llm, prompt)
        tiers = llm.engine.core.tiers
        fetched = tiers.stats.fetched_blocks["host"]
        (out,) = llm.generate([prompt], GREEDY)
        assert tiers.stats.fetched_blocks["host"] - fetched == 3
    assert out.outputs[0].token_ids == expected
    by_tier = out.cached_tokens_by_tier
    assert (by_tier["device"], by_tier["host"]) == (4 * BLOCK, 3 * BLOCK)
    assert out.num_cached_tokens == 7 * BLOCK


def test_a_hint_moves_and_pins_the_runs_after_a_hole(tiny_source, reference):
    """A hint finds every held run, fetches the host run after a hole ahead of the turn and
    pins the device runs, so the turn finds all of them on the device."""
    prompt, expected = reference
    with LLM(source=tiny_source, num_kv_blocks=64, host_num_blocks=64) as llm:
        blocks = _host_run_between_holes(llm, prompt)
        tiers = llm.engine.core.tiers
        found = llm.engine.hint("s", prompt, expected_arrival_s=5.0)
        assert (found["device"], found["host"]) == (4, 3)
        assert all(blocks[i].pin_until > 0 for i in (0, 1, 7, 8))
        while tiers.num_pending_jobs:
            tiers.poll(wait_s=0.05)
        fetched = tiers.stats.fetched_blocks["host"]
        assert fetched == 3
        (out,) = llm.generate([prompt], GREEDY)
        assert tiers.stats.fetched_blocks["host"] == fetched  # nothing left to fetch
    assert out.outputs[0].token_ids == expected
    assert out.cached_tokens_by_tier["device"] == 7 * BLOCK
    assert out.cached_tokens_by_tier.get("host", 0) == 0
