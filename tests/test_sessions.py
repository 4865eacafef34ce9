"""Sessions over the KV hierarchy: every path to a turn's history gives the same tokens.

A tiny random Llama with SmolLM2's tokenizer and chat template replays 20 ShareGPT
conversations of 4 turns, round robin, with greedy decoding. The reference recomputes every
history from the stored tokens with caching off; each other path is forced by tier sizes and
must match it token for token, and must actually have been taken (asserted from the per-turn
cache accounting).
"""

from __future__ import annotations

import gzip
import json

import pytest
from tests.conftest import SHAREGPT_SAMPLE

from cadenza import LLM, SamplingParams

NUM_CONVERSATIONS = 20
NUM_TURNS = 4
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def chat_source(tiny_chat_source):
    return tiny_chat_source


@pytest.fixture(scope="module")
def conversations() -> list[list[str]]:
    if not SHAREGPT_SAMPLE.exists():
        pytest.skip(f"workload data missing: {SHAREGPT_SAMPLE}")
    found: list[list[str]] = []
    with gzip.open(SHAREGPT_SAMPLE, "rt") as handle:
        for line in handle:
            users = [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
            if len(users) >= NUM_TURNS:
                found.append([u[:300] for u in users[:NUM_TURNS]])
            if len(found) == NUM_CONVERSATIONS:
                break
    return found


def replay(llm: LLM, conversations: list[list[str]]) -> tuple[list[list[int]], list]:
    """Round-robin turns; returns every turn's generated tokens and its output."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens: list[list[int]] = []
    outputs = []
    for turn in range(NUM_TURNS):
        for i, conv in enumerate(conversations):
            messages = [{"role": "user", "content": conv[turn]}]
            (out,) = llm.chat(messages, params, session_id=f"conv-{i}")
            tokens.append(out.outputs[0].token_ids)
            outputs.append(out)
    return tokens, outputs


def make_llm(source, **kwargs) -> LLM:
    kwargs.setdefault("kv_cost_model", "linear")
    return LLM(source=source, max_num_batched_tokens=512, **kwargs)


@pytest.fixture(scope="module")
def reference(chat_source, conversations):
    with make_llm(chat_source, enable_prefix_caching=False, num_kv_blocks=256) as llm:
        tokens, outputs = replay(llm, conversations)
    assert all(o.num_cached_tokens == 0 for o in outputs)
    return tokens


def tier_tokens(outputs, tier: str) -> int:
    return sum(o.cached_tokens_by_tier.get(tier, 0) for o in outputs)


def test_device_path_matches_recompute(chat_source, conversations, reference):
    with make_llm(chat_source, num_kv_blocks=4096) as llm:
        tokens, outputs = replay(llm, conversations)
    assert tokens == reference
    later = outputs[NUM_CONVERSATIONS:]
    assert all(o.num_cached_tokens > 0 for o in later)
    assert all(o.num_redundant_tokens == 0 for o in later)  # partial tails are continued too


def test_host_path_matches_recompute(chat_source, conversations, reference):
    with make_llm(chat_source, num_kv_blocks=96, host_num_blocks=4096) as llm:
        tokens, outputs = replay(llm, conversations)
        stats = llm.engine.tiers.stats
    assert tokens == reference
    assert tier_tokens(outputs, "host") > 0 and stats.fetched_blocks["host"] > 0


def test_disk_path_matches_recompute(chat_source, conversations, reference, tmp_path):
    with make_llm(
        chat_source, num_kv_blocks=96, disk_num_blocks=4096, kv_disk_path=str(tmp_path)
    ) as llm:
        tokens, outputs = replay(llm, conversations)
        stats = llm.engine.tiers.stats
    assert tokens == reference
    assert tier_tokens(outputs, "disk") > 0 and stats.fetched_blocks["disk"] > 0


def test_partial_drop_recomputes_leading_chunks(chat_source, conversations, reference):
    with make_llm(chat_source, num_kv_blocks=96) as llm:
        tokens, outputs = replay(llm, conversations)
    assert tokens == reference
    holes = [o for o in outputs if o.num_cached_tokens > 0 and o.num_redundant_tokens >= 16]
    assert holes, "no turn reused later blocks after recomputing dropped leading ones"


LONG_TEXT = (
    "Explain how a paged key-value cache lets a serving engine keep many conversations "
    "resident at once, and what happens to a conversation's cache between its turns. "
)


def say(llm: LLM, session: str, text: str, max_tokens: int = 4, **kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    (out,) = llm.chat([{"role": "user", "content": text}], params, session_id=session, **kwargs)
    return out


class ManualClock:
    """The engine's clock, moved by the test only: TTLs expire at chosen times, no sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ttl_pin_survives_a_burst_and_expires(chat_source):
    clock = ManualClock()
    with make_llm(chat_source, num_kv_blocks=128, clock=clock) as llm:
        tiers = llm.engine.tiers
        say(llm, "pinned", LONG_TEXT * 2, retention={"ttl_s": 30})
        say(llm, "short", LONG_TEXT, retention={"ttl_s": 0.3})
        pinned = tiers.num_pinned()
        assert 0 < pinned <= tiers.pin_cap
        clock.now += 0.4  # past the short TTL, well inside the long one
        for i in range(50):
            say(llm, f"burst-{i}", f"{i}: " + LONG_TEXT * 2, retention={"ttl_s": 30})
            assert tiers.num_pinned() <= tiers.pin_cap
        history = len(llm.sessions.store.history_token_ids("pinned"))
        out = say(llm, "pinned", "And after a tool call?")
        assert out.cached_tokens_by_tier["device"] == out.num_cached_tokens
        assert out.num_cached_tokens >= (history - 1) // 16 * 16
        short_history = len(llm.sessions.store.history_token_ids("short"))
        expired = say(llm, "short", "And this one?")
        # Its TTL ran out, so the burst evicted it (all but the shared system-prompt blocks).
        assert expired.num_cached_tokens < (short_history - 1) // 16 * 16
        assert expired.num_redundant_tokens > 16


def test_hint_prefetches_host_kv_to_the_device(chat_source):
    with make_llm(chat_source, num_kv_blocks=96, host_num_blocks=2048) as llm:
        say(llm, "hinted", LONG_TEXT * 2)
        for i in range(40):
            say(llm, f"other-{i}", f"{i}: " + LONG_TEXT * 2)
        found = llm.hint("hinted", expected_arrival_s=1.0)
        assert found["host"] > 0 and found["device"] < found["host"]
        while llm.engine.tiers.num_pending_jobs:
            llm.engine.tiers.poll(wait_s=0.1)
        history = len(llm.sessions.store.history_token_ids("hinted"))
        out = say(llm, "hinted", "Next question.")
        assert out.cached_tokens_by_tier.get("host", 0) == 0
        assert out.cached_tokens_by_tier["device"] == out.num_cached_tokens
        assert out.num_cached_tokens >= (history - 1) // 16 * 16
    with pytest.raises(KeyError):
        make_llm(chat_source, num_kv_blocks=32).hint("nobody")


def test_swap_preemption_matches_unpreempted_run(chat_source):
    tok = chat_source.tokenizer
    prompts = [tok.encode(f"{i} " + LONG_TEXT[: 60 + 7 * i]) for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    with make_llm(chat_source, num_kv_blocks=512) as roomy:
        expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    with make_llm(chat_source, num_kv_blocks=28, host_num_blocks=512) as tight:
        got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
        assert tight.engine.scheduler.num_preemptions > 0
        assert tight.engine.tiers.stats.offloaded_blocks > 0
    assert got == expected


def test_session_api_errors(chat_source):
    with make_llm(chat_source, num_kv_blocks=64) as llm:
        with pytest.raises(ValueError, match="retention"):
            say(llm, "s", "hi", retention={"ttl_s": -1})
        with pytest.raises(ValueError, match="at least one new message"):
            llm.chat([], SamplingParams(max_tokens=2), session_id="s")
        say(llm, "s", "hello")
        assert [m["role"] for m in llm.session_messages("s")] == ["user", "assistant"]
        assert llm.sessions.store.turns("s")[0].status == "complete"
        assert llm.end_session("s", delete=True)
        assert llm.session_messages("s") == []


def test_a_session_id_the_server_could_not_address_is_refused_offline(chat_source):
    """The offline API takes the server's session-id rules (the two can share a store, where
    a session is addressed as /v1/sessions/{id}): a clear ValueError, nothing stored."""
    with make_llm(chat_source, num_kv_blocks=64) as llm:
        message = [{"role": "user", "content": "hi"}]
        for bad, why in (("a/b", "may not contain '/'"), ("", "1 to 256"), ("t\tab", "control")):
            with pytest.raises(ValueError, match=why):
                llm.chat(message, SamplingParams(max_tokens=1), session_id=bad)
            assert llm.sessions.store.get_session(bad) is None
        (ok,) = llm.chat(message, SamplingParams(max_tokens=1), session_id="a-b:c")
        assert ok.outputs[0].token_ids
