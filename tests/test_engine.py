"""Engine behaviour on the real model: batch invariance, prefix caching, seeds, accounting."""

from __future__ import annotations

import pytest
from tests.conftest import sharegpt_user_messages

from cadenza import LLM, SamplingParams


@pytest.fixture(scope="module")
def prompts(smollm2_source):
    from cadenza.model.source import ModelSource  # noqa: F401  (source fixture loads the model)

    tokenizer = smollm2_source.tokenizer
    texts = sharegpt_user_messages(16, min_chars=10, max_chars=900)
    return [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]


def test_batch_invariance_under_chunking_and_preemption(smollm2_source, prompts):
    prompts = prompts[:8]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = LLM(source=smollm2_source, num_kv_blocks=256, enable_prefix_caching=False)
    expected = [alone.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    # 8 requests at once, a 48-token budget (chunked prefill) and too few blocks for all of
    # them (preemption with recompute).
    crowded = LLM(
        source=smollm2_source,
        num_kv_blocks=40,
        max_num_batched_tokens=48,
        enable_prefix_caching=False,
    )
    outputs = crowded.generate(prompts, params)
    assert crowded.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_prefix_cache_computes_only_the_suffix(smollm2_source):
    tokenizer = smollm2_source.tokenizer
    filler = " ".join(sharegpt_user_messages(40, min_chars=50, max_chars=2000))
    prefix = tokenizer.encode(filler)[:1000]
    first = prefix + tokenizer.encode(" Summarise the text above.")
    second = prefix + tokenizer.encode(" List three topics from the text above.")
    params = SamplingParams(max_tokens=16, temperature=0.0)
    llm = LLM(source=smollm2_source, num_kv_blocks=400)
    llm.generate([first], params)
    cached = llm.generate([second], params)[0]
    assert cached.num_cached_tokens == (1000 // 16) * 16
    other_tenant = llm.generate([{"prompt_token_ids": second, "cache_salt": "tenant-b"}], params)[0]
    assert other_tenant.num_cached_tokens == 0
    uncached = LLM(source=smollm2_source, num_kv_blocks=400, enable_prefix_caching=False)
    reference = uncached.generate([second], params)[0]
    assert reference.num_cached_tokens == 0
    assert cached.outputs[0].token_ids == reference.outputs[0].token_ids
    assert other_tenant.outputs[0].token_ids == reference.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_across_batches(smollm2_source, prompts):
    llm = LLM(source=smollm2_source, num_kv_blocks=256)
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    again = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    unseeded = SamplingParams(max_tokens=20, temperature=1.0)
    mixed = (
        llm.generate([prompts[3], prompts[0], prompts[5]], [unseeded, seeded, unseeded])[1]
        .outputs[0]
        .token_ids
    )
    assert alone == again == mixed
    other_seed = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=99)
    assert llm.generate([prompts[0]], other_seed)[0].outputs[0].token_ids != alone


def test_blocks_all_free_after_requests_end_and_cache_clears(smollm2_source, prompts):
    llm = LLM(source=smollm2_source, num_kv_blocks=128, max_num_batched_tokens=64)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ids = [engine.add_request(None, p, params) for p in prompts[:6]]
    engine.step()
    engine.abort_request(ids[2])  # an abort mid-flight returns its blocks too
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_free_blocks == engine.num_total_blocks
    assert llm.reset_prefix_cache()
    assert engine.scheduler.kv.pool.num_cached_blocks == 0
    assert engine.num_free_blocks == engine.num_total_blocks


def test_stop_strings_logprobs_and_bad_input(smollm2_source):
    llm = LLM(source=smollm2_source, num_kv_blocks=128)
    messages = [{"role": "user", "content": "Count from 1 to 10 separated by commas."}]
    free_run = llm.chat(messages, SamplingParams(max_tokens=40, temperature=0.0))[0].outputs[0]
    middle = len(free_run.text) // 2
    stop = free_run.text[middle : middle + 3]
    assert len(stop) == 3
    stopped = llm.chat(
        messages, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop], logprobs=3)
    )[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free_run.text[: free_run.text.index(stop)]
    assert len(stopped.token_ids) < len(free_run.token_ids)
    assert len(stopped.logprobs) == len(stopped.token_ids)
    assert all(len(entry) >= 3 for entry in stopped.logprobs)
    with pytest.raises(ValueError, match="context"):
        llm.generate([[5] * 9000], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[5, 10**9]], SamplingParams(max_tokens=4))
    # Bad input of the wrong kind says what to pass (not a float cut to an int, not a
    # TypeError from deep inside).
    with pytest.raises(ValueError, match="must be integers; got \\[2.7\\]"):
        llm.generate({"prompt_token_ids": [1, 2.7]}, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="stop_token_ids must be in"):
        llm.generate("Hello", SamplingParams(max_tokens=2, stop_token_ids=[10**7]))
    with pytest.raises(ValueError, match="not valid Unicode"):
        llm.generate("hi \ud800", SamplingParams(max_tokens=2))
    with pytest.raises(TypeError, match="must be a SamplingParams"):
        llm.generate("Hello", {"max_tokens": 4})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompts must be text"):
        llm.generate(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a prompt is text or a list of token ids"):
        llm.generate([5, "Hello"])  # type: ignore[list-item]
    # The engine keeps serving after rejecting bad input.
    assert llm.generate("Hello", SamplingParams(max_tokens=3))[0].outputs[0].token_ids
