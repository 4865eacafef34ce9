"""The HTTP server over a cluster of in-process workers (tiny random model, SmolLM2's
tokenizer and chat template): the operator endpoints, the worker header, draining a worker
under a live stream, and a router restart that loses nothing committed.

The same router over Ray actors is in ``test_cluster_ray.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from tests.cluster_harness import running_cluster_server
from tests.server_harness import engine_config, running_server

from cadenza.cluster.worker_handle import LocalWorker, worker_config
from cadenza.engine import LLMEngine
from cadenza.server.serve import check_cluster_args

MODEL = "tiny-chat"


def local_handles(config, source, n: int = 2) -> list[LocalWorker]:
    def factory(cfg):
        return lambda: LLMEngine(cfg, source)

    return [LocalWorker(f"w{i}", factory(worker_config(config, f"w{i}"))) for i in range(n)]


def chat(base: str, session: str, text: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "session_id": session,
        **extra,
    }
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=60)


def test_cluster_endpoints_header_and_drain_under_a_live_stream(tiny_chat_source):
    config = engine_config(None, MODEL, num_blocks=256)
    with running_cluster_server(
        local_handles(config, tiny_chat_source), config, MODEL, routing="least-loaded"
    ) as server:
        base = server.base_url
        reply = chat(base, "s1", "Hello there")
        assert reply.status_code == 200 and reply.headers["x-cadenza-worker"] in ("w0", "w1")
        listing = httpx.get(base + "/v1/cluster/workers").json()
        assert listing["routing"] == "least-loaded"
        assert [w["state"] for w in listing["data"]] == ["alive", "alive"]
        # A long streamed completion; drain its worker while it streams.
        body = {
            "model": MODEL,
            "prompt": "Count with me:",
            "max_tokens": 200,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }

        def stream() -> tuple[int, str, str]:
            text = ""
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                worker = r.headers.get("x-cadenza-worker", "")
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
                return r.status_code, worker, text

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(stream)
            cluster = server.cluster
            deadline = time.monotonic() + 30
            while not any(s.requests for s in cluster.slots.values()):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)
            busy = next(w for w, s in cluster.slots.items() if s.requests)
            drained = httpx.post(base + f"/v1/cluster/workers/{busy}/drain", timeout=60).json()
            assert drained["state"] == "drained" and drained["migrated"] == 1
            status, first_worker, text = future.result(timeout=120)
        assert status == 200 and first_worker == busy
        unmoved = httpx.post(base + "/v1/completions", json={**body, "stream": False}, timeout=120)
        assert unmoved.json()["choices"][0]["text"] == text
        assert unmoved.headers["x-cadenza-worker"] != busy  # drained: no new work there
        workers = {w["id"]: w for w in httpx.get(base + "/v1/cluster/workers").json()["data"]}
        assert workers[busy]["releasable"]
        metrics = httpx.get(base + "/metrics").text
        assert 'cadenza:cluster_migrations_total{kind="drain"}' in metrics
        assert "cadenza:cluster_live_migration_downtime_seconds_total" in metrics
        # Bad input gets a clear 4xx and changes nothing.
        assert httpx.post(base + "/v1/cluster/workers/w7/drain").status_code == 404
        missing = httpx.post(base + "/v1/cluster/requests/nope/migrate")
        assert missing.status_code == 404 and "not running" in missing.json()["error"]["message"]
        other = next(w for w in cluster.slots if w != busy)
        last = httpx.post(base + f"/v1/cluster/workers/{other}/drain")
        assert last.status_code == 409, last.text  # nothing would be left to serve
        assert "last one taking work" in last.json()["error"]["message"]
        assert httpx.post(base + f"/v1/cluster/workers/{busy}/activate").json()["state"] == "alive"


def test_a_router_restart_loses_nothing_committed(tiny_chat_source, tmp_path):
    store = str(tmp_path / "store.sqlite")
    config = engine_config(
        store,
        MODEL,
        num_blocks=256,
        host_num_blocks=64,
        disk_num_blocks=512,
        kv_disk_path=str(tmp_path / "kv"),
    )
    with running_cluster_server(
        local_handles(config, tiny_chat_source), config, MODEL, routing="sticky"
    ) as server:
        first = chat(server.base_url, "kept", "Remember the number seven.", 12)
        assert first.status_code == 200
        history = first.json()["usage"]["total_tokens"]
    # A new router, new workers (their disk tiers are where they were), the same store.
    with running_cluster_server(
        local_handles(config, tiny_chat_source), config, MODEL, routing="kv-aware"
    ) as server:
        transcript = httpx.get(server.base_url + "/v1/sessions/kept").json()
        assert transcript["num_turns"] == 1
        second = chat(server.base_url, "kept", "Which number?", 4)
        assert second.status_code == 200
        usage = second.json()["usage"]
        assert usage["prompt_tokens"] > history
        # The history's KV came back from the disk tier of a rejoined worker.
        assert usage["prompt_tokens_details"]["cached_tokens"] >= history - 16


def test_a_single_in_process_server_lists_itself_as_one_worker(tiny_chat_source):
    with running_server(tiny_chat_source, model=MODEL) as server:
        reply = chat(server.base_url, "solo", "Hi")
        assert reply.headers["x-cadenza-worker"] == "w0"
        (worker,) = httpx.get(server.base_url + "/v1/cluster/workers").json()["data"]
        assert worker["id"] == "w0" and worker["state"] == "alive"
        refused = httpx.post(server.base_url + "/v1/cluster/workers/w0/drain")
        assert refused.status_code == 409


def test_cluster_flags_are_checked():
    import argparse

    def args(**kw):
        base = {"workers": 1, "worker_threads": 1, "routing": None, "ray_address": None}
        return argparse.Namespace(**{**base, **kw})

    check_cluster_args(args(workers=2, routing="symphony"))
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        check_cluster_args(args(workers=0))
    with pytest.raises(ValueError, match="--routing needs a cluster"):
        check_cluster_args(args(routing="sticky"))
