"""The cluster on a real local Ray cluster: two workers as Ray actors behind the real server.

* Exactness across workers: SmolLM2 conversations (ShareGPT user turns) whose turns alternate
  workers give the same replies as the same conversations on one engine; a hinted turn moved
  to the other worker finds its history there (``cached_tokens`` >= history - one block).
* Faults: a worker SIGKILLed while streams run on it loses only cached KV; every stream
  completes (no 5xx) with the tokens of an unfailed run; Ray restarts the worker, it rejoins
  with a new process and serves again.
* The operator surface: ``X-Cadenza-Worker``, ``/v1/cluster/workers``, drain, ``/metrics``.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import replace

import httpx
import openai
import pytest
from tests.cluster_harness import running_cluster_server
from tests.conftest import sharegpt_user_messages
from tests.server_harness import engine_config, running_server

ray = pytest.importorskip("ray")

from cadenza.cluster import ray_backend  # noqa: E402
from cadenza.cluster.placement import make_policy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL = "smollm2-135m"
CACHE = {"num_blocks": 320, "host_num_blocks": 256}
BLOCK = 16


@pytest.fixture(scope="module")
def ray_cluster():
    yield
    ray_backend.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster, smollm2_source, tmp_path_factory):
    config = engine_config(None, MODEL, **CACHE)
    handles = ray_backend.start_workers(2, config, threads_per_worker=1)
    with running_cluster_server(
        handles, config, MODEL, routing="round-robin", rejoin_poll_s=0.5
    ) as running:
        yield running


@pytest.fixture(scope="module")
def single(smollm2_source):
    """The same model on one in-process engine: the reference."""
    with running_server(smollm2_source, model=MODEL, **CACHE) as running:
        yield running


def chat(base_url: str, session: str, text: str, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(
        base_url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "session_id": session,
        },
        timeout=120,
    )


def test_conversations_alternating_workers_match_one_engine(cluster, single):
    messages = sharegpt_user_messages(20, min_chars=20, max_chars=300)
    for conv in range(10):
        workers = []
        for turn in range(2):
            text = messages[conv * 2 + turn]
            got = chat(cluster.base_url, f"c{conv}", text, max_tokens=12)
            want = chat(single.base_url, f"c{conv}", text, max_tokens=12)
            assert got.status_code == 200, got.text
            workers.append(got.headers["x-cadenza-worker"])
            a, b = got.json(), want.json()
            assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
            assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
        # Round-robin sends consecutive turns of a conversation to different workers.
        assert workers[0] != workers[1], workers
    stats = cluster.cluster.stats
    assert stats.placements_by_worker["w0"] >= 10 and stats.placements_by_worker["w1"] >= 10


def test_a_hinted_turn_finds_its_migrated_history(cluster):
    router = cluster.cluster
    # Move for a difference of one request (the default waits for two).
    router.policy = make_policy("symphony", router.index, replace(router.costs, rebalance_margin=1))
    router.routing = "symphony"
    try:
        first = chat(cluster.base_url, "hinted", sharegpt_user_messages(1, min_chars=200)[0], 24)
        home = first.headers["x-cadenza-worker"]
        history = first.json()["usage"]["total_tokens"]
        # A long request keeps the session's worker busy, so the hint picks the other one.
        busy = concurrent.futures.ThreadPoolExecutor(1).submit(
            httpx.post,
            cluster.base_url + "/v1/completions",
            json={
                "model": MODEL,
                "prompt": "Once upon a time",
                "max_tokens": 160,
                "ignore_eos": True,
                "temperature": 0,
            },  # fmt: skip
            timeout=120,
        )
        deadline = time.monotonic() + 60
        while not router.slots[home].requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        hint = httpx.post(cluster.base_url + "/v1/sessions/hinted/hint", json={})
        assert hint.status_code == 200, hint.text
        pending = router.migrations.hints["hinted"]
        assert pending.target != home
        deadline = time.monotonic() + 60
        while pending.task is not None and not pending.task.done():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = chat(cluster.base_url, "hinted", "Tell me more.", 8)
        assert second.status_code == 200
        assert second.headers["x-cadenza-worker"] == pending.target
        cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= history - BLOCK
        assert router.stats.migrations["hint"] >= 1
        assert router.stats.hint_outcomes["found"] >= 1
        assert busy.result().status_code == 200
    finally:
        router.policy = make_policy("round-robin", router.index, router.costs)
        router.routing = "round-robin"


def test_workers_endpoint_header_and_metrics(cluster):
    listing = httpx.get(cluster.base_url + "/v1/cluster/workers").json()
    assert [w["id"] for w in listing["data"]] == ["w0", "w1"]
    for worker in listing["data"]:
        assert worker["state"] == "alive" and worker["pid"] > 0
        assert {"device", "host", "disk"} <= set(worker["tiers"])
    assert len({w["pid"] for w in listing["data"]}) == 2
    text = httpx.get(cluster.base_url + "/metrics").text
    for name in (
        'cadenza:worker_up{worker="w0"} 1.0',
        "cadenza:cluster_routing_decisions_total",
        "cadenza:cluster_hint_outcomes_total",
        "cadenza:cluster_migrations_total",
        "cadenza:cluster_prompt_tokens_by_source_total",
        "cadenza:cluster_load_imbalance",
        "cadenza:prompt_tokens_total",
    ):
        assert name in text, name


def stream_completion(base_url: str, prompt: str, max_tokens: int) -> tuple[int, str]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    text = ""
    with client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ) as stream:
        for chunk in stream:
            text += chunk.choices[0].text
    return 200, text


def test_a_killed_worker_loses_only_cache_and_rejoins(cluster):
    router = cluster.cluster
    prompts = [f"Story {i}: the {w} of the northern sea" for i, w in enumerate("abcd")]
    want = [stream_completion(cluster.base_url, p, 48)[1] for p in prompts]
    pids = {
        w["id"]: w["pid"]
        for w in httpx.get(cluster.base_url + "/v1/cluster/workers").json()["data"]
    }
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream_completion, cluster.base_url, p, 48) for p in prompts]
        deadline = time.monotonic() + 60
        while not router.slots["w0"].requests:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # let them stream a little
        router.slots["w0"].handle.kill()
        results = [f.result(timeout=300) for f in futures]
    assert [r[0] for r in results] == [200] * 4
    assert [r[1] for r in results] == want
    assert router.stats.worker_failures >= 1 and router.stats.failovers >= 1
    # Ray restarts the actor: a new process rejoins and serves again.
    deadline = time.monotonic() + 180
    while router.slots["w0"].state != "alive":
        assert time.monotonic() < deadline, "the worker did not rejoin"
        time.sleep(0.2)
    workers = {
        w["id"]: w for w in httpx.get(cluster.base_url + "/v1/cluster/workers").json()["data"]
    }
    assert workers["w0"]["pid"] != pids["w0"]
    drained = httpx.post(cluster.base_url + "/v1/cluster/workers/w1/drain")
    assert drained.status_code == 200 and drained.json()["state"] == "drained"
    again = chat(cluster.base_url, "after-rejoin", "Hello again!", 4)
    assert again.status_code == 200 and again.headers["x-cadenza-worker"] == "w0"
    assert (
        httpx.post(cluster.base_url + "/v1/cluster/workers/w1/activate").json()["state"] == "alive"
    )
    assert httpx.post(cluster.base_url + "/v1/cluster/workers/w9/drain").status_code == 404
