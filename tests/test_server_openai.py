"""The unmodified ``openai`` SDK against the real server (tiny model, real HTTP)."""

from __future__ import annotations

import httpx
import openai
import pytest
from tests.server_harness import MODEL, running_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tiny_chat_source):
    with running_server(tiny_chat_source) as running:
        yield running


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused") as c:
        yield c


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_matches_the_offline_engine(server, client):
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, seed=1
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == 12 or choice.finish_reason == "stop"
    # The same prompt through the engine directly gives the same text.
    tok = server.engine.tokenizer
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(prompt)
    again = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, seed=1
    )
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_streaming_chat_with_usage_and_logprobs(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=3,
    )
    text, finish, usage, logprob_tokens = "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            if choice.logprobs and choice.logprobs.content:
                logprob_tokens += len(choice.logprobs.content)
                assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == logprob_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completions_text_and_tokens(client):
    reply = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 5
    by_ids = client.completions.create(
        model=MODEL, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0, logprobs=2
    )
    logprobs = by_ids.choices[0].logprobs
    assert len(logprobs.tokens) == by_ids.usage.completion_tokens
    # The OpenAI SDK's other token form, a list of token lists, with the one prompt allowed.
    nested = client.completions.create(
        model=MODEL, prompt=[[1, 2, 3, 4]], max_tokens=3, temperature=0
    )
    assert nested.choices[0].text == by_ids.choices[0].text
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        client.completions.create(model=MODEL, prompt=[[1, 2], [3, 4]], max_tokens=1)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == reply.choices[0].text


def test_resent_history_reuses_the_generated_tokens(server, client):
    """A stateless client resends the conversation with the server's own reply as text; the
    server splices the exact generated ids back in, so the whole history is a cache hit."""
    messages = [{"role": "user", "content": "Tell me about the sea, briefly please."}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0
    )
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the mountains?"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0
    )
    history = first.usage.prompt_tokens + first.usage.completion_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= (history - 1) // 16 * 16


def test_session_header_continues_with_only_new_messages(server, client):
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Remember the number seven."}],
        max_tokens=6,
        temperature=0,
        extra_headers={"X-Session-Id": "sess-a"},
    )
    second = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What number?"}],
        max_tokens=4,
        temperature=0,
        extra_headers={"X-Session-Id": "sess-a"},
    )
    history = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens > history
    assert second.usage.prompt_tokens_details.cached_tokens >= history - 1
    # Resending the full transcript on the session is recognised, not duplicated.
    transcript = httpx.get(server.base_url + "/v1/sessions/sess-a").json()["messages"]
    third = client.chat.completions.create(
        model=MODEL,
        messages=transcript + [{"role": "user", "content": "Thanks."}],
        max_tokens=2,
        temperature=0,
        extra_body={"session_id": "sess-a"},
    )
    before = second.usage.prompt_tokens + second.usage.completion_tokens
    assert before < third.usage.prompt_tokens < before + 32
    hint = httpx.post(
        server.base_url + "/v1/sessions/sess-a/hint", json={"expected_arrival_s": 1.0}
    )
    assert hint.status_code == 200 and sum(hint.json()["blocks_by_tier"].values()) > 0
    assert httpx.delete(server.base_url + "/v1/sessions/sess-a").status_code == 200
    assert httpx.post(server.base_url + "/v1/sessions/nope/hint", json={}).status_code == 404


def test_session_edges_get_clear_answers(server):
    """A purge while the session's turn streams is a 409 and the turn completes; a UTF-8
    session id in the header names the same session as in the body; NaN times, retention
    without a session and an over-long id in a URL are 400s that say why."""
    base = server.base_url
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count slowly."}],
        "max_tokens": 300,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "session_id": "purge-me",
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        purge = httpx.delete(base + "/v1/sessions/purge-me", params={"purge": "true"})
        assert purge.status_code == 409, purge.text
        assert purge.json()["error"]["code"] == "session_busy"
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    assert httpx.get(base + "/v1/sessions/purge-me").json()["num_turns"] == 1
    purged = httpx.delete(base + "/v1/sessions/purge-me", params={"purge": "true"})
    assert purged.status_code == 200
    assert httpx.get(base + "/v1/sessions/purge-me").status_code == 404

    short = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    url = base + "/v1/chat/completions"
    by_header = httpx.post(url, json=short, headers={"X-Session-Id": "café".encode()})
    assert by_header.status_code == 200, by_header.text
    assert httpx.get(base + "/v1/sessions/café").json()["num_turns"] == 1
    assert httpx.post(url, json={**short, "session_id": "café"}).status_code == 200
    assert httpx.get(base + "/v1/sessions/café").json()["num_turns"] == 2
    latin = httpx.post(url, json=short, headers={"X-Session-Id": b"caf\xe9"})
    assert latin.status_code == 400 and "not UTF-8" in latin.text

    nan = httpx.post(
        base + "/v1/sessions/café/hint",
        content=b'{"expected_arrival_s": NaN}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 400 and "finite" in nan.text, nan.text
    kept = httpx.post(url, json={**short, "retention": {"ttl_s": 5}})
    assert kept.status_code == 400 and "retention keeps a session's KV" in kept.text
    long_id = httpx.get(base + "/v1/sessions/" + "s" * 300)
    assert long_id.status_code == 400 and "1 to 256 characters" in long_id.text


def test_session_ids_that_could_not_be_addressed_again_are_refused(server, client):
    """A session id is addressed later as /v1/sessions/{id}: one with '/' (or a control
    character, or over 256 characters) is a 400, as is a header and a body field naming two
    different sessions; nothing is started for them, and an agreeing pair works."""
    url = server.base_url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    cases = [
        ({"X-Session-Id": "a/b"}, {}, "may not contain '/'"),
        ({}, {"session_id": "a/b"}, "may not contain '/'"),
        ({"X-Session-Id": "tab\there"}, {}, "control characters"),
        ({"X-Session-Id": "s" * 257}, {}, "1 to 256 characters"),
        ({"X-Session-Id": "s-one"}, {"session_id": "s-two"}, "different sessions"),
    ]
    for headers, extra, message in cases:
        r = httpx.post(url, json={**body, **extra}, headers=headers)
        assert r.status_code == 400, (headers, extra, r.text)
        error = r.json()["error"]
        assert message in error["message"] and error["param"] == "session_id"
    for sid in ("a/b", "s-one", "s-two"):
        assert httpx.get(server.base_url + "/v1/sessions/" + sid).status_code == 404
    same = httpx.post(
        url, json={**body, "session_id": "s-same"}, headers={"X-Session-Id": "s-same"}
    )
    assert same.status_code == 200, same.text
    assert httpx.get(server.base_url + "/v1/sessions/s-same").status_code == 200


def test_bad_requests_get_clear_4xx(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-1
        )
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError, match="4096"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}])
    raw = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400 and "error" in raw.json()
    wrong_type = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": "hello"},
    )
    assert wrong_type.status_code == 400
    assert "messages" in wrong_type.json()["error"]["message"]
    # A field that takes several forms says which, once (not one error per form).
    mixed = httpx.post(
        server.base_url + "/v1/completions",
        json={"model": MODEL, "prompt": ["hello", [1, 2, 3], 5]},
    )
    assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "prompt"
    forms = "str, list[int], list[str], list[list[int]]"
    assert f"prompt: must be one of the forms {forms}" in mixed.text
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    # ...and it still serves.
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.choices[0].message.content is not None
