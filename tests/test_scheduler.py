"""Scheduler behaviour on the real core objects, driven step by step without a model."""

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.hashing import hash_seed
from cadenza.core.request import Request, RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler


def make_scheduler(num_blocks=64, budget=32, max_seqs=16, reserve=0.0, caching=True):
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
        CacheConfig(
            block_size=4, admission_reserve_fraction=reserve, enable_prefix_caching=caching
        ),
        num_blocks,
        clock=lambda: 0.0,
    )


def make_request(rid, n_prompt, max_tokens=4, arrival=0.0, priority=0, first_token=100):
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(first_token, first_token + n_prompt)),
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        eos_token_ids=(0,),
        block_size=4,
        hash_seed=hash_seed("m", None),
        max_total_tokens=n_prompt + max_tokens,
        arrival_time=arrival,
        priority=priority,
    )


def run_step(sched):
    out = sched.schedule()
    sampled = {c.request.request_id: 7 for c in out.chunks if c.samples}
    sched.update_from_output(out, sampled)
    return out


def test_chunked_prefill_respects_budget_and_mixes_with_decodes():
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("a", 6, arrival=0))
    sched.add_request(make_request("b", 40, arrival=1))
    out = run_step(sched)
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in out.chunks] == [
        ("a", 6, True),
        ("b", 10, False),
    ]
    out = run_step(sched)
    # a decodes one token, b takes the rest of the budget as its next chunk.
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 15)]
    assert out.num_tokens == 16


def test_preemption_frees_newest_and_it_recomputes_later():
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens + 8 output need 4 blocks each.
    sched = make_scheduler(num_blocks=6, budget=64)
    sched.add_request(make_request("old", 8, max_tokens=8, arrival=0))
    sched.add_request(make_request("new", 8, max_tokens=8, arrival=1, first_token=500))
    preempted = []
    for _ in range(40):
        if not sched.has_unfinished_requests():
            break
        out = run_step(sched)
        preempted += [r.request_id for r in out.preempted]
        assert sched.kv.pool.num_free_blocks >= 0
    assert "new" in preempted and "old" not in preempted
    assert not sched.has_unfinished_requests()
    assert sched.kv.pool.num_free_blocks == 6


def test_admission_keeps_reserve_for_running_decodes():
    sched = make_scheduler(num_blocks=10, budget=64, reserve=0.2)  # reserve = 2 blocks
    sched.add_request(make_request("a", 28))  # 7 blocks: leaves 3 >= 2
    sched.add_request(make_request("b", 8))  # 2 more would leave 1 < 2: must wait
    out = run_step(sched)
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert sched.requests["b"].status == RequestStatus.WAITING


def test_prefix_hit_sets_num_cached_tokens_and_skips_compute():
    sched = make_scheduler(budget=64)
    sched.add_request(make_request("a", 20, max_tokens=1))
    run_step(sched)
    assert not sched.has_unfinished_requests()
    sched.add_request(make_request("b", 20, max_tokens=1))
    out = run_step(sched)
    assert out.chunks[0].num_tokens == 4  # 16 cached (4 full blocks), the last 4 recomputed
    assert out.chunks[0].request.num_cached_tokens == 16


def test_abort_any_time_returns_blocks():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("a", 30))
    run_step(sched)
    assert sched.kv.pool.num_free_blocks < 64
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_free_blocks == 64
    assert not sched.has_unfinished_requests()


def test_priority_policy_admits_most_urgent_first():
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=8, policy="priority"),
        CacheConfig(block_size=4, admission_reserve_fraction=0.0),
        64,
        clock=lambda: 0.0,
    )
    sched.add_request(make_request("low", 8, priority=5, arrival=0))
    sched.add_request(make_request("high", 8, priority=0, arrival=1, first_token=300))
    out = run_step(sched)
    assert [c.request.request_id for c in out.chunks] == ["high"]
