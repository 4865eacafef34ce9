"""``GET /metrics``: vLLM-style Prometheus metrics fed by the engine's step hook and read from
the engine at scrape time (tiny model, real HTTP)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.server_harness import MODEL, running_server

from cadenza.outputs import CompletionOutput, RequestOutput
from cadenza.server.metrics import TOKEN_SOURCES, prompt_token_sources

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

REQUIRED = [
    "cadenza:time_to_first_token_seconds_bucket",
    "cadenza:time_per_output_token_seconds_bucket",
    "cadenza:e2e_request_latency_seconds_bucket",
    "cadenza:prompt_tokens_total",
    "cadenza:generation_tokens_total",
    "cadenza:prompt_tokens_by_source_total",
    "cadenza:prefix_cache_queries_total",
    "cadenza:prefix_cache_hits_total",
    "cadenza:num_preemptions_total",
    "cadenza:swap_bytes_total",
    "cadenza:request_success_total",
    "cadenza:num_requests_running",
    "cadenza:num_requests_waiting",
    "cadenza:kv_cache_usage_perc",
    "cadenza:kv_tier_blocks",
    "cadenza:kv_pinned_blocks",
]


def scrape(base_url: str) -> Samples:
    reply = httpx.get(base_url + "/metrics", timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "model_name")
            assert sample.labels.get("model_name") == MODEL, sample
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def complete(base_url: str, prompt: list[int], max_tokens: int = 6) -> dict:
    reply = httpx.post(
        base_url + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def chat(base_url: str, content: str, session: str, max_tokens: int = 4) -> dict:
    reply = httpx.post(
        base_url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        headers={"X-Session-Id": session},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="module")
def server(tiny_chat_source):
    with running_server(tiny_chat_source) as running:
        yield running


def test_every_metric_is_exposed_with_the_cadenza_prefix(server):
    samples = scrape(server.base_url)
    names = {name for name, _ in samples}
    missing = [name for name in REQUIRED if name not in names]
    assert not missing, missing
    # Our own registry: nothing from the process-global default one (python_gc_*, process_*).
    assert all(name.startswith("cadenza:") for name in names), sorted(names)[:5]
    for direction in ("in", "out"):
        assert ("cadenza:swap_bytes_total", frozenset({("direction", direction)})) in samples
    for source in TOKEN_SOURCES:
        assert value(samples, "cadenza:prompt_tokens_by_source_total", source=source) >= 0
    assert value(samples, "cadenza:kv_tier_blocks", tier="device", state="capacity") == 256


def test_counters_and_histograms_follow_requests(server):
    prompt = list(range(100, 180))  # five full blocks and no more
    before = scrape(server.base_url)
    first = complete(server.base_url, prompt)
    second = complete(server.base_url, prompt)
    after = scrape(server.base_url)

    prompt_tokens = first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    generated = first["usage"]["completion_tokens"] + second["usage"]["completion_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 64
    assert delta(before, after, "cadenza:prompt_tokens_total") == prompt_tokens
    assert delta(before, after, "cadenza:generation_tokens_total") == generated
    by_source = {
        s: delta(before, after, "cadenza:prompt_tokens_by_source_total", source=s)
        for s in TOKEN_SOURCES
    }
    assert sum(by_source.values()) == prompt_tokens
    assert by_source["device"] == cached
    assert by_source["new"] == prompt_tokens - cached
    assert delta(before, after, "cadenza:prefix_cache_queries_total") == prompt_tokens
    assert delta(before, after, "cadenza:prefix_cache_hits_total") == cached
    finished = sum(
        delta(before, after, "cadenza:request_success_total", finished_reason=r)
        for r in ("stop", "length")
    )
    assert finished == 2
    for histogram in (
        "cadenza:time_to_first_token_seconds",
        "cadenza:e2e_request_latency_seconds",
        "cadenza:time_per_output_token_seconds",
    ):
        assert delta(before, after, histogram + "_count") == 2, histogram
        assert delta(before, after, histogram + "_sum") > 0, histogram
    # Idle again: nothing running or waiting, the finished prompts' blocks are cached and free.
    assert value(after, "cadenza:num_requests_running") == 0
    assert value(after, "cadenza:num_requests_waiting") == 0
    assert value(after, "cadenza:kv_cache_usage_perc") == 0
    assert value(after, "cadenza:kv_tier_blocks", tier="device", state="cached") >= 5


def test_gauges_see_a_request_in_flight(server):
    """A scrape while a long request streams sees it running and its blocks in use."""
    body = {
        "model": MODEL,
        "prompt": list(range(200, 240)),
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", server.base_url + "/v1/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        during = scrape(server.base_url)
    assert value(during, "cadenza:num_requests_running") == 1
    assert value(during, "cadenza:kv_cache_usage_perc") > 0
    assert value(during, "cadenza:kv_tier_blocks", tier="device", state="used") >= 3


def test_tier_metrics_count_swaps_and_host_hits(tiny_chat_source):
    """A small device pool over a host tier: a session's KV is pushed down by other traffic
    and fetched back for its next turn, which shows up as host-sourced prompt tokens and
    swap bytes in both directions."""
    with running_server(tiny_chat_source, num_blocks=48, host_num_blocks=256) as srv:
        before = scrape(srv.base_url)
        chat(srv.base_url, "Tell me a long story about ships. " * 12, "metrics-tiers")
        for i in range(8):
            complete(srv.base_url, [300 + i * 97 + j for j in range(150)], max_tokens=2)
        second = chat(srv.base_url, "And then?", "metrics-tiers")
        after = scrape(srv.base_url)
    by_tier = {
        s: delta(before, after, "cadenza:prompt_tokens_by_source_total", source=s)
        for s in ("device", "host", "disk")
    }
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert by_tier["host"] > 0, by_tier
    assert delta(before, after, "cadenza:swap_bytes_total", direction="out") > 0
    assert delta(before, after, "cadenza:swap_bytes_total", direction="in") > 0
    assert value(after, "cadenza:kv_tier_blocks", tier="host", state="capacity") == 256
    assert value(after, "cadenza:kv_tier_blocks", tier="host", state="used") > 0
    assert delta(before, after, "cadenza:kv_fetched_blocks_total", tier="host") > 0


def test_metrics_need_no_api_key(tiny_chat_source):
    """Scrapers carry no tenant key; the metrics are aggregates over every tenant."""
    with running_server(tiny_chat_source, api_keys=["key-a"]) as srv:
        reply = httpx.post(
            srv.base_url + "/v1/completions",
            json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2},
            headers={"Authorization": "Bearer key-a"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        samples = scrape(srv.base_url)
    assert value(samples, "cadenza:prompt_tokens_total") == 3


def test_metrics_can_be_disabled(tiny_chat_source):
    with running_server(tiny_chat_source, metrics=False) as srv:
        reply = httpx.get(srv.base_url + "/metrics", timeout=10)
    assert reply.status_code == 404
    assert "not enabled" in reply.json()["error"]["message"]


def _output(prompt: int, cached: int, by_tier: dict[str, int], redundant: int) -> RequestOutput:
    completion = CompletionOutput(0, "", [1], None, None)
    return RequestOutput(
        "r", None, list(range(prompt)), [completion], False, cached,
        cached_tokens_by_tier=by_tier, num_redundant_tokens=redundant,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "cached", "by_tier", "redundant", "expected"),
    [
        (100, 0, {}, 0, {"new": 100}),
        (100, 64, {"device": 32, "host": 16, "disk": 16}, 0,
         {"device": 32, "host": 16, "disk": 16, "new": 36}),
        # A failed disk fetch: found on disk, recomputed instead.
        (100, 32, {"device": 32, "disk": 32}, 20, {"device": 32, "recomputed": 20, "new": 48}),
        # A reused partial tail block beyond the found full blocks counts as device.
        (100, 40, {"host": 32}, 0, {"host": 32, "device": 8, "new": 60}),
    ],
)  # fmt: skip
def test_prompt_token_sources_sum_to_the_prompt(prompt, cached, by_tier, redundant, expected):
    sources = prompt_token_sources(_output(prompt, cached, by_tier, redundant))
    assert sum(sources.values()) == prompt
    assert {k: v for k, v in sources.items() if v} == expected
