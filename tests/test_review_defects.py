"""Defects found in review of the single-node server, each pinned by a test: disconnects while
waiting, aborted-request metrics, separate session namespaces per API, interrupted turns
reported, a KV pool too small for the default context, and the offline API recognising a
resent conversation."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time

import httpx
import openai
import pytest
from tests.server_harness import MODEL, running_server

from cadenza import LLM, SamplingParams
from cadenza.session.store import ConversationStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(f"cadenza:{name}"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_a_client_gone_while_its_request_waits_leaves_the_queue(tiny_chat_source):
    with running_server(tiny_chat_source, max_num_seqs=1) as server:
        long_body = {
            "model": MODEL,
            "prompt": "tell a long story",
            "max_tokens": 4000,
            "ignore_eos": True,
        }

        def run_hog() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(server.base_url + "/v1/completions", json=long_body, timeout=120)

        hog = threading.Thread(target=run_hog, daemon=True)
        hog.start()
        scheduler = server.engine.scheduler
        wait_until(lambda: len(scheduler.running) == 1)
        short = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
        with pytest.raises(httpx.ReadTimeout):  # gives up while its request still waits
            httpx.post(server.base_url + "/v1/completions", json=short, timeout=1.0)
        # The waiting request is gone from the queue at once, never prefilled; the hog runs on.
        wait_until(lambda: not scheduler.waiting)
        assert len(scheduler.running) == 1
        wait_until(lambda: metric(server.base_url, "request_aborted_total", reason="client") >= 1)
        # Nothing leaks: once the hog is aborted too, every block is free again.
        for request_id in list(scheduler.requests):
            server.state.engine.abort(request_id)
        engine = server.engine
        wait_until(lambda: engine.num_free_blocks == engine.num_total_blocks)


def test_sessions_of_each_api_are_separate(tiny_chat_source):
    with running_server(tiny_chat_source) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        chain = client.responses.create(model=MODEL, input="Hello there.", max_output_tokens=4)
        chain_session = chain.model_extra["session_id"]
        with pytest.raises(openai.ConflictError, match="belongs to the responses API"):
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Sneaking in."}],
                max_tokens=4,
                extra_headers={"X-Session-Id": chain_session},
            )
        reply = httpx.delete(
            f"{server.base_url}/v1/sessions/{chain_session}", params={"purge": "true"}, timeout=10
        )
        assert reply.status_code == 409, reply.text
        # The chain is intact and continues.
        again = client.responses.create(
            model=MODEL,
            input="And again.",
            previous_response_id=chain.id,
            max_output_tokens=4,
        )
        assert again.usage.input_tokens_details.cached_tokens > 0
        # A chat session's own id still works as before, hints included.
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Mine."}],
            max_tokens=4,
            extra_headers={"X-Session-Id": "chat-1"},
        )
        hint = httpx.post(f"{server.base_url}/v1/sessions/chat-1/hint", json={}, timeout=10)
        assert hint.status_code == 200, hint.text


def test_an_interrupted_turn_is_reported_not_hidden(tiny_chat_source, tmp_path):
    path = str(tmp_path / "store.sqlite")
    store = ConversationStore(path)
    store.create_session("chain_x", metadata={"api": "responses"})
    store.begin_turn("chain_x", "resp_interrupted", [5, 6, 7], [{"role": "user", "content": "?"}])
    store.close()  # the process "died" with the turn pending
    with running_server(tiny_chat_source, store=path) as server:
        reply = httpx.get(f"{server.base_url}/v1/responses/resp_interrupted", timeout=10)
        assert reply.status_code == 404
        assert "interrupted by a server restart" in reply.json()["error"]["message"]
        missing = httpx.get(f"{server.base_url}/v1/responses/resp_never", timeout=10).json()
        assert "never existed" in missing["error"]["message"]
        assert metric(server.base_url, "interrupted_turns_total") == 1


def test_a_pool_smaller_than_the_context_is_sized_or_refused_at_start(tiny_chat_source, caplog):
    with caplog.at_level(logging.WARNING, logger="cadenza.engine"):
        llm = LLM(source=tiny_chat_source, num_kv_blocks=8, kv_cost_model="linear")
    with llm:
        assert llm.engine.max_model_len == 8 * 16
        assert re.search(r"KV cache holds 128 tokens", caplog.text)
        # A request without max_tokens is served (up to the context the pool holds).
        (out,) = llm.generate([list(range(10, 40))], SamplingParams(ignore_eos=True))
        assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) <= 128
    with pytest.raises(ValueError, match=r"max_model_len 1024 needs 64 KV blocks .* has 8"):
        LLM(source=tiny_chat_source, num_kv_blocks=8, max_model_len=1024, kv_cost_model="linear")


def test_offline_chat_recognises_a_resent_conversation(tiny_chat_source):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with LLM(source=tiny_chat_source, num_kv_blocks=128, kv_cost_model="linear") as llm:
        first = [{"role": "user", "content": "What is a KV cache?"}]
        (one,) = llm.chat(first, params, session_id="s")
        history = len(llm.sessions.history("s"))
        resent = first + [
            {"role": "assistant", "content": one.outputs[0].text},
            {"role": "user", "content": "And why keep it?"},
        ]
        (two,) = llm.chat(resent, params, session_id="s")
        roles = [m["role"] for m in llm.session_messages("s")]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert two.num_cached_tokens >= (history - 1) // 16 * 16
        with pytest.raises(ValueError, match="already holds every message"):
            everything = resent + [{"role": "assistant", "content": two.outputs[0].text}]
            llm.chat(everything, params, session_id="s")
