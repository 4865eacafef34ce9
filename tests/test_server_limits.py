"""Limits and failure behaviour of the real server (tiny model, real HTTP, real sockets).

* schema fuzzing (schemathesis): no generated request, valid or invalid, gets a 5xx;
* bad inputs get the right 4xx with a message that says what to fix, and the server keeps
  serving;
* API keys separate tenants (cache and sessions);
* a full queue answers 429 with Retry-After and serves everyone else;
* a client that disconnects mid-stream leaves no request and no referenced block behind;
* a bounded load test (64 streaming clients, sessions mixed in): only 200 or 429, bounded
  memory, and everything drains;
* SIGTERM drains: the in-flight stream completes, the process exits 0, the store is consistent.

The whole file runs in under two minutes on two cores. ``CADENZA_LOAD_SECONDS`` sets the
default load test's duration; ``CADENZA_SLOW=1`` also runs a one-minute variant (marked
``slow``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from tests.server_harness import MODEL, RunningServer, free_port, running_server

from cadenza.engine_api import GetLoad
from cadenza.model.source import ModelSource

# Fuzzing: examples per operation and generation mode (valid, then invalid requests).
FUZZ_EXAMPLES = 20
# Load test: duration (s) of the default run and of the ``slow`` one, concurrent clients,
# and the growth of this process's resident memory the run may cause.
LOAD_SECONDS = float(os.environ.get("CADENZA_LOAD_SECONDS", "20"))
LOAD_SECONDS_SLOW = 60.0
LOAD_CLIENTS = 64
LOAD_SESSION_EVERY = 4  # every 4th client runs session turns instead of one-off requests
LOAD_TURNS_PER_SESSION = 6  # then starts a new session (a session's history stays short)
RSS_GROWTH_BUDGET_MIB = 512
MAX_BODY_BYTES = 256 << 10
CONTEXT = 4096  # the tiny model's max_position_embeddings


# ----------------------------------------------------------------------------- helpers
def quiescent(server: RunningServer) -> dict[str, int]:
    """What is left in the engine, read through the engine API: unfinished requests and blocks
    not free. A block holding only an unreferenced cached prefix counts as free (it is
    reusable at once)."""
    load = asyncio.run(server.state.engine.call(GetLoad()))
    return {
        "unfinished": load.num_running + load.num_waiting,
        "running": load.num_running,
        "waiting": load.num_waiting,
        "not_free_blocks": load.device_blocks_total - load.device_blocks_free,
        "pending_transfers": load.queued_copy_jobs,
    }


def wait_until_drained(server: RunningServer, timeout_s: float = 10.0) -> dict[str, int]:
    """Poll until nothing is left in the engine (aborts of disconnected clients are queued
    commands, so they land within a step or two); returns the last observation."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = quiescent(server)
        left["streams"] = server.state.engine.num_streams
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def chat_body(content: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def assert_serving(base_url: str, headers: dict[str, str] | None = None) -> None:
    reply = httpx.post(
        base_url + "/v1/chat/completions",
        json=chat_body("Still there?"),
        headers=headers,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def error_of(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    return body["error"]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def server(tiny_chat_source: ModelSource) -> Iterator[RunningServer]:
    with running_server(tiny_chat_source, max_body_bytes=MAX_BODY_BYTES) as running:
        yield running


# ----------------------------------------------------------------------------- fuzzing
def _fuzz_operation(operation: Any, mode: GenerationMode, failures: list[str]) -> int:
    """Up to FUZZ_EXAMPLES generated requests against one operation; returns how many ran.
    No shrinking (each example is a real HTTP round trip); a 5xx is recorded with the
    request that caused it."""
    ran = 0

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run: a failure is reproducible
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal ran
        ran += 1
        response = case.call(timeout=60)
        if response.status_code >= 500:
            failures.append(
                f"{operation.label} ({mode.value}) -> {response.status_code} "
                f"{response.text[:300]!r}\n    path={case.path_parameters} query={case.query} "
                f"body={str(case.body)[:500]}"
            )

    # No invalid request exists for an operation without inputs (GET /health).
    with contextlib.suppress(Unsatisfiable):
        run()
    return ran


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(server: RunningServer, mode: GenerationMode):
    """Every operation of the server's own ``/openapi.json``: schema-valid requests
    (positive) and schema-violating ones (negative) get 2xx or 4xx, never 5xx."""
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    failures: list[str] = []
    counts = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        counts[operation.label] = _fuzz_operation(operation, mode, failures)
    assert "POST /v1/chat/completions" in counts and "POST /v1/completions" in counts
    assert sum(counts.values()) >= FUZZ_EXAMPLES * 2, counts
    assert not failures, "\n".join(failures)
    assert_serving(server.base_url)


# ----------------------------------------------------------------------------- bad inputs
def _post(base_url: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(base_url + path, timeout=30, **kwargs)


def test_malformed_json_is_400(server: RunningServer):
    reply = _post(
        server.base_url,
        "/v1/chat/completions",
        content=b'{"model": "tiny-chat", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 400, reply.text
    message = error_of(reply)["message"]
    assert message.startswith("request body is not valid JSON") and "character 36" in message
    assert_serving(server.base_url)


def test_wrong_types_are_400_naming_the_field(server: RunningServer):
    reply = _post(
        server.base_url,
        "/v1/chat/completions",
        json={"model": MODEL, "messages": "hello", "max_tokens": 4},
    )
    assert reply.status_code == 400, reply.text
    error = error_of(reply)
    assert error["param"].startswith("messages") and "messages" in error["message"]
    reply = _post(
        server.base_url,
        "/v1/completions",
        json={"model": MODEL, "prompt": "x", "temperature": "hot"},
    )
    assert reply.status_code == 400, reply.text
    assert error_of(reply)["param"] == "temperature"
    assert_serving(server.base_url)


@pytest.mark.parametrize(
    ("path", "body", "field", "shown"),
    [
        ("/v1/chat/completions", chat_body("hi", max_tokens=True), "max_tokens", "true"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "temperature": "0.7"},
            "temperature",
            "a string",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": False}, "seed", "false"),
        ("/v1/sessions/s-bool/hint", {"expected_arrival_s": True}, "expected_arrival_s", "true"),
    ],
)
def test_a_number_sent_as_a_boolean_or_string_is_400(
    server: RunningServer, path: str, body: dict[str, Any], field: str, shown: str
):
    # Read leniently, true would be 1 and "0.7" would be 0.7: an answer to another question.
    reply = _post(server.base_url, path, json=body)
    assert reply.status_code == 400, reply.text
    error = error_of(reply)
    assert error["param"] == field
    assert f"must be a JSON number, not {shown}" in error["message"]
    assert_serving(server.base_url)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_negative_max_tokens_is_400(server: RunningServer, path: str):
    body = chat_body("hi", max_tokens=-5)
    if path == "/v1/completions":
        body = {"model": MODEL, "prompt": "hi", "max_tokens": -5}
    reply = _post(server.base_url, path, json=body)
    assert reply.status_code == 400, reply.text
    error = error_of(reply)
    assert error["param"] == "max_tokens"
    assert "greater than or equal to 1" in error["message"]
    assert_serving(server.base_url)


def test_over_long_context_is_400_naming_both_lengths(server: RunningServer):
    prompt = [17] * (CONTEXT + 904)
    reply = _post(server.base_url, "/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert reply.status_code == 400, reply.text
    message = error_of(reply)["message"]
    assert str(len(prompt)) in message and str(CONTEXT) in message, message
    # The same through chat (text, tokenized by the server).
    reply = _post(server.base_url, "/v1/chat/completions", json=chat_body("word " * 5000))
    assert reply.status_code == 400, reply.text
    message = error_of(reply)["message"]
    assert str(CONTEXT) in message and "tokens" in message, message
    assert_serving(server.base_url)


def test_unknown_previous_response_id_is_404(server: RunningServer):
    paths = httpx.get(server.base_url + "/openapi.json", timeout=30).json()["paths"]
    if "/v1/responses" not in paths:
        pytest.skip("the Responses API (/v1/responses) is not part of this server yet")
    reply = _post(
        server.base_url,
        "/v1/responses",
        json={"model": MODEL, "input": "hi", "previous_response_id": "resp_does_not_exist"},
    )
    assert reply.status_code == 404, reply.text
    error = error_of(reply)
    assert "resp_does_not_exist" in error["message"]
    assert_serving(server.base_url)


def test_unknown_model_is_404(server: RunningServer):
    reply = _post(
        server.base_url, "/v1/chat/completions", json={**chat_body("hi"), "model": "gpt-9"}
    )
    assert reply.status_code == 404, reply.text
    error = error_of(reply)
    assert error["code"] == "model_not_found"
    assert "gpt-9" in error["message"] and MODEL in error["message"]
    assert_serving(server.base_url)


def test_oversized_body_is_413(server: RunningServer):
    body = chat_body("x" * (MAX_BODY_BYTES + 1000))
    reply = _post(server.base_url, "/v1/chat/completions", json=body)
    assert reply.status_code == 413, reply.text
    assert str(MAX_BODY_BYTES) in error_of(reply)["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: a chunked upload
        yield json.dumps(body).encode()

    reply = _post(
        server.base_url,
        "/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 413, reply.text
    assert_serving(server.base_url)


def test_second_concurrent_turn_on_a_session_is_409(server: RunningServer):
    session = {"X-Session-Id": "busy-session"}
    long_turn = chat_body("Tell me everything.", max_tokens=3000, ignore_eos=True, stream=True)
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", server.base_url + "/v1/chat/completions", json=long_turn, headers=session
        ) as first,
    ):
        assert first.status_code == 200
        lines = first.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data:"))
        second = client.post(
            server.base_url + "/v1/chat/completions", json=chat_body("Me too!"), headers=session
        )
        assert second.status_code == 409, second.text
        error = error_of(second)
        assert error["code"] == "session_busy" and error["param"] == "session_id"
    # The first turn was abandoned (connection closed): the session takes turns again.
    deadline = time.monotonic() + 10
    while True:
        third = httpx.post(
            server.base_url + "/v1/chat/completions",
            json=chat_body("Now?"),
            headers=session,
            timeout=30,
        )
        if third.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert third.status_code == 200, third.text


# ----------------------------------------------------------------------------- tenants
@pytest.fixture(scope="module")
def keyed_server(tiny_chat_source: ModelSource) -> Iterator[RunningServer]:
    with running_server(tiny_chat_source, api_keys=["key-a", "key-b"]) as running:
        yield running


A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def test_missing_or_wrong_api_key_is_401(keyed_server: RunningServer):
    url = keyed_server.base_url + "/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-a"}):
        reply = httpx.post(url, json=chat_body("hi"), headers=headers, timeout=30)
        assert reply.status_code == 401, (headers, reply.text)
        assert error_of(reply)["code"] == "invalid_api_key"
        assert reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(keyed_server.base_url + "/v1/models", timeout=30).status_code == 401
    assert_serving(keyed_server.base_url, A)


def test_tenants_do_not_share_prefix_cache(keyed_server: RunningServer):
    """Token-id prompts that no earlier test sent: no shared chat-template prefix either."""
    url = keyed_server.base_url + "/v1/completions"
    body = {"model": MODEL, "prompt": list(range(1000, 1080)), "max_tokens": 2}

    def cached(headers: dict[str, str]) -> int:
        reply = httpx.post(url, json=body, headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(A) == 0
    assert cached(B) == 0  # the exact same prompt, another tenant: no hit
    assert cached(A) >= 64  # A's own repeat hits (all full blocks)
    assert cached(B) >= 64  # and so does B's, from B's own copy


def test_sessions_of_one_tenant_are_invisible_to_another(keyed_server: RunningServer):
    base = keyed_server.base_url
    session = {"X-Session-Id": "shared-name"}
    reply = httpx.post(
        base + "/v1/chat/completions",
        json=chat_body("A's secret: 42."),
        headers={**A, **session},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert httpx.get(base + "/v1/sessions/shared-name", headers=A, timeout=30).status_code == 200
    for method in ("GET", "DELETE"):
        reply = httpx.request(method, base + "/v1/sessions/shared-name", headers=B, timeout=30)
        assert reply.status_code == 404, (method, reply.text)
    reply = httpx.post(base + "/v1/sessions/shared-name/hint", json={}, headers=B, timeout=30)
    assert reply.status_code == 404, reply.text
    # B using the same session id gets a session of its own, without A's history.
    reply = httpx.post(
        base + "/v1/chat/completions",
        json=chat_body("Hello from B."),
        headers={**B, **session},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    seen_by_b = httpx.get(base + "/v1/sessions/shared-name", headers=B, timeout=30).json()
    assert "42" not in json.dumps(seen_by_b["messages"])
    seen_by_a = httpx.get(base + "/v1/sessions/shared-name", headers=A, timeout=30).json()
    assert seen_by_a["num_turns"] == 1 and "42" in json.dumps(seen_by_a["messages"])


# ----------------------------------------------------------------------------- queue full
def test_full_queue_is_429_with_retry_after_and_the_rest_are_served(tiny_chat_source):
    async def flood(base_url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/completions",
                        json={
                            "model": MODEL,
                            "prompt": f"Request {i}:",
                            "max_tokens": 24,
                            "ignore_eos": True,
                        },
                    )
                    for i in range(24)
                )
            )

    with running_server(tiny_chat_source, max_waiting=2, max_num_seqs=2) as srv:
        replies = asyncio.run(flood(srv.base_url))
        statuses = Counter(r.status_code for r in replies)
        assert set(statuses) <= {200, 429}, statuses
        assert statuses[429] >= 1 and statuses[200] >= 2, statuses
        for reply in replies:
            if reply.status_code == 429:
                assert int(reply.headers["retry-after"]) >= 1
                assert error_of(reply)["code"] == "queue_full"
            else:
                assert reply.json()["usage"]["completion_tokens"] == 24
        left = wait_until_drained(srv)
        assert not any(left.values()), left
        assert_serving(srv.base_url)


# ----------------------------------------------------------------------------- disconnects
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_mid_stream_frees_everything(server: RunningServer, path: str):
    body: dict[str, Any] = chat_body("Go on forever.", max_tokens=3000, ignore_eos=True)
    if path == "/v1/completions":
        body = {"model": MODEL, "prompt": "Go on forever.", "max_tokens": 3000, "ignore_eos": True}
    body["stream"] = True
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", server.base_url + path, json=body) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        for _ in range(5):
            next(line for line in lines if line.startswith("data:"))
        assert quiescent(server)["running"] == 1
    left = wait_until_drained(server)
    assert not any(left.values()), left


def test_client_disconnect_while_waiting_for_a_non_streamed_reply(server: RunningServer):
    body = {"model": MODEL, "prompt": "Long.", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=0.5)
    left = wait_until_drained(server)
    assert not any(left.values()), left


# ----------------------------------------------------------------------------- load
async def _load(base_url: str, seconds: float) -> dict[str, Any]:
    """LOAD_CLIENTS clients stream requests back to back for ``seconds``; every fourth runs
    session turns (new session every few turns). Records statuses, bad streams, peak RSS."""
    statuses: Counter[int] = Counter()
    bad_streams: list[str] = []
    peak_rss = rss_mib()
    stop_at = time.monotonic() + seconds
    rng = random.Random(1234)
    limits = httpx.Limits(max_connections=LOAD_CLIENTS + 8, max_keepalive_connections=LOAD_CLIENTS)

    async def one(client: httpx.AsyncClient, cid: int, turn: int) -> None:
        session = cid % LOAD_SESSION_EVERY == 0
        headers = {}
        max_tokens = rng.randint(4, 48)
        if session:
            headers["X-Session-Id"] = f"load-{cid}-{turn // LOAD_TURNS_PER_SESSION}"
            body = chat_body(f"Client {cid}, turn {turn}: continue.", max_tokens, stream=True)
            path = "/v1/chat/completions"
        else:
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(20))
            body = {
                "model": MODEL,
                "prompt": f"{cid}: {words}",
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            path = "/v1/completions"
        async with client.stream("POST", path, json=body, headers=headers) as reply:
            statuses[reply.status_code] += 1
            if reply.status_code != 200:
                await reply.aread()
                if reply.status_code == 429:
                    await asyncio.sleep(min(float(reply.headers.get("retry-after", 1)), 1.0))
                return
            events = [line async for line in reply.aiter_lines() if line.startswith("data:")]
            if not events or events[-1] != "data: [DONE]":
                bad_streams.append(f"{path} client {cid}: {events[-2:]}")

    async def client_loop(cid: int) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
            turn = 0
            while time.monotonic() < stop_at:
                await one(client, cid, turn)
                turn += 1

    async def watch_memory() -> None:
        nonlocal peak_rss
        while time.monotonic() < stop_at + 5:
            peak_rss = max(peak_rss, rss_mib())
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch_memory())
    await asyncio.gather(*(client_loop(cid) for cid in range(LOAD_CLIENTS)))
    watcher.cancel()
    return {"statuses": statuses, "bad_streams": bad_streams, "peak_rss_mib": peak_rss}


def _run_load(tiny_chat_source: ModelSource, seconds: float) -> None:
    with running_server(tiny_chat_source, max_waiting=48) as srv:
        assert_serving(srv.base_url)  # warm: first-request costs are not load
        before = rss_mib()
        result = _load(srv.base_url, seconds)
        result = asyncio.run(result)
        statuses = result["statuses"]
        print(
            f"load {seconds:.0f}s: {dict(statuses)}, RSS {before:.0f} -> peak "
            f"{result['peak_rss_mib']:.0f} MiB"
        )
        assert set(statuses) <= {200, 429}, statuses
        assert statuses[200] >= LOAD_CLIENTS, statuses
        assert not result["bad_streams"], result["bad_streams"][:5]
        assert result["peak_rss_mib"] - before < RSS_GROWTH_BUDGET_MIB, result
        left = wait_until_drained(srv)
        assert not any(left.values()), left
        assert_serving(srv.base_url)


def test_load_64_streaming_clients(tiny_chat_source: ModelSource):
    """LOAD_CLIENTS streaming clients for LOAD_SECONDS: only 200 or 429, every stream ends
    with [DONE], this process's RSS grows by less than RSS_GROWTH_BUDGET_MIB, and once the
    clients stop every block that is not a cached prefix is free again."""
    _run_load(tiny_chat_source, LOAD_SECONDS)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CADENZA_SLOW"), reason="the one-minute load test: set CADENZA_SLOW=1"
)
def test_load_64_streaming_clients_for_a_minute(tiny_chat_source: ModelSource):
    _run_load(tiny_chat_source, LOAD_SECONDS_SLOW)


# ----------------------------------------------------------------------------- SIGTERM
def _write_hf_dir(source: ModelSource, directory: Path) -> Path:
    """The tiny chat model as a Hugging Face directory (what ``cadenza serve --model`` loads):
    config.json, safetensors weights and the SmolLM2 tokenizer."""
    from safetensors.torch import save_file

    from cadenza.model.random_init import random_state_dict

    config = source.config
    assert source.tokenizer is not None
    directory.mkdir(parents=True)
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
    }
    (directory / "config.json").write_text(json.dumps(raw))
    save_file(random_state_dict(config, seed=7), str(directory / "model.safetensors"))
    source.tokenizer.save(directory)
    return directory


def test_sigterm_drains_the_stream_in_flight(tiny_chat_source: ModelSource, tmp_path: Path):
    from cadenza.session.store import ConversationStore

    model = _write_hf_dir(tiny_chat_source, tmp_path / "tiny-chat-hf")
    data = tmp_path / "data"
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "cadenza.cli",
        "serve",
        "--model",
        str(model),
        "--data-dir",
        str(data),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--num-threads",
        "1",
        "--kv-cache-memory-gib",
        "0.05",
        "--kv-host-gib",
        "0.01",
        "--kv-disk-gib",
        "0.05",
        "--kv-eviction-policy",
        "lru",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    max_tokens = 400
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cadenza serve did not come up"
            time.sleep(0.2)
        body = chat_body(
            "Keep talking.",
            max_tokens,
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        body["model"] = str(model)
        events: list[str] = []
        with (
            httpx.Client(timeout=60) as client,
            client.stream(
                "POST",
                base + "/v1/chat/completions",
                json=body,
                headers={"X-Session-Id": "drain"},
            ) as reply,
        ):
            assert reply.status_code == 200, reply.read()
            lines = reply.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    events.append(line)
                if len(events) == 5:
                    break
            process.send_signal(signal.SIGTERM)
            events += [line for line in lines if line.startswith("data:")]
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = process.stdout.read() if process.stdout else ""
    assert events[-1] == "data: [DONE]", (events[-3:], output)
    usage = json.loads(events[-2][len("data: ") :])["usage"]
    assert usage["completion_tokens"] == max_tokens
    finish = [json.loads(e[6:])["choices"] for e in events[:-1]]
    assert [c[0]["finish_reason"] for c in finish if c and c[0]["finish_reason"]] == ["length"]
    assert code == 0, output

    with ConversationStore(data / "store.sqlite") as store:
        session = store.get_session("drain")
        assert session is not None and session.num_turns == 1
        assert store.pending_turn("drain") is None
        turns = store.turns("drain", include_incomplete=True)
        assert [t.status for t in turns] == ["complete"]
        assert len(turns[0].output_token_ids) == max_tokens
        assert turns[0].finish_reason == "length"
