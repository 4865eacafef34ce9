"""The Responses and Conversations APIs through the unmodified ``openai`` SDK (real server,
tiny model): chains reuse KV, forks, streaming, storage, tenants, and restart survival."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from tests.server_harness import MODEL, running_server

from cadenza.server.state import scoped_session, tenant_name

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KEY, OTHER_KEY = "key-a", "key-b"
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_chat_source):
    with running_server(tiny_chat_source, api_keys=[KEY, OTHER_KEY]) as running:
        yield running


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def _cached(response) -> int:
    return response.usage.input_tokens_details.cached_tokens


def _session(response) -> str:
    return response.model_extra["session_id"]


def _history(response) -> int:
    return response.usage.input_tokens + response.usage.output_tokens


def test_five_turn_chain_sends_only_new_input_and_reuses_kv(client):
    previous, responses = None, []
    for turn in range(5):
        response = client.responses.create(
            input=f"Turn {turn}: tell me one more fact about the sea.",
            previous_response_id=previous,
            instructions="You are terse." if turn == 0 else None,
            **GREEDY,
        )
        assert response.object == "response"
        assert response.status in ("completed", "incomplete")
        assert response.output[0].type == "message"
        assert response.output_text == response.output[0].content[0].text
        assert response.previous_response_id == previous
        usage = response.usage
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
        if previous is not None:
            before = responses[-1]
            # The whole earlier history is input, and all of its full blocks were cached.
            assert usage.input_tokens > _history(before)
            assert _cached(response) >= (_history(before) - 1) // 16 * 16 > 0
            assert _cached(response) > _cached(before)
            assert _session(response) == _session(before)  # the same session, next turn
        responses.append(response)
        previous = response.id
    assert responses[0].instructions == "You are terse."


def test_instructions_enter_the_history_once_and_where_they_change(server, client):
    request = {**GREEDY, "max_output_tokens": 2}
    first = client.responses.create(input="One.", instructions="Be brief.", **request)
    second = client.responses.create(
        input="Two.", instructions="Be brief.", previous_response_id=first.id, **request
    )
    third = client.responses.create(
        input="Three.", instructions="Be poetic.", previous_response_id=second.id, **request
    )
    assert (second.instructions, third.instructions) == ("Be brief.", "Be poetic.")
    headers = {"Authorization": f"Bearer {KEY}"}
    session = httpx.get(f"{server.base_url}/v1/sessions/{_session(third)}", headers=headers)
    transcript = [(m["role"], m["content"]) for m in session.json()["messages"]]
    assert transcript == [
        ("system", "Be brief."),
        ("user", "One."),
        ("assistant", first.output_text),
        ("user", "Two."),
        ("assistant", second.output_text),
        ("system", "Be poetic."),
        ("user", "Three."),
        ("assistant", third.output_text),
    ]


def test_streaming_gives_the_same_text_as_non_streaming(client):
    request = {"input": "Write a short poem about rain.", **GREEDY, "max_output_tokens": 12}
    plain = client.responses.create(store=False, **request)
    events = list(client.responses.create(stream=True, **request))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    final_kind = "response.completed" if plain.status == "completed" else "response.incomplete"
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final_kind,
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text
    assert events[-1].response.output_text == plain.output_text
    # Streamed and stored: retrievable with the same text.
    stored = client.responses.retrieve(events[-1].response.id)
    assert stored.output_text == plain.output_text
    # The SDK's stream helper accumulates the same text.
    with client.responses.stream(**request) as stream:
        helper = [event for event in stream]
        if plain.status == "completed":
            assert stream.get_final_response().output_text == plain.output_text
    snapshot = "".join(e.delta for e in helper if e.type == "response.output_text.delta")
    assert snapshot == plain.output_text


def test_retrieve_delete_store_false_and_unknown_ids(server, client):
    response = client.responses.create(input="Hello there.", metadata={"k": "v"}, **GREEDY)
    stored = client.responses.retrieve(response.id)
    assert stored.output_text == response.output_text
    assert stored.metadata == {"k": "v"} and stored.store is True
    items = client.responses.input_items.list(response.id)
    assert [item.content[0].text for item in items.data] == ["Hello there."]

    session = _session(response)
    assert client.responses.delete(response.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="More.", previous_response_id=response.id, **GREEDY)
    # Nothing references the chain's session any more: its history is gone too.
    headers = {"Authorization": f"Bearer {KEY}"}
    gone = httpx.get(f"{server.base_url}/v1/sessions/{session}", headers=headers)
    assert gone.status_code == 404

    unstored = client.responses.create(input="Do not keep this.", store=False, **GREEDY)
    assert unstored.store is False and unstored.output_text is not None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(input="Hi", previous_response_id="resp_missing", **GREEDY)
    assert err.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(
            input=[{"role": "user", "content": [{"type": "input_image"}]}], **GREEDY
        )


def first_id(client) -> str:
    return client.responses.create(input="Seed.", **GREEDY).id


def test_a_client_leaving_a_stream_frees_its_conversation(server, client):
    conv = client.conversations.create(items=[{"role": "user", "content": "Tell a long story."}])
    body = {
        **GREEDY,
        "input": "Go on.",
        "conversation": conv.id,
        "stream": True,
        "max_output_tokens": 3000,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/responses", json=body, headers=headers, timeout=30
    ) as reply:
        lines = reply.iter_lines()
        deltas = (line for line in lines if "output_text.delta" in line)
        for _ in range(3):
            next(deltas)
        with pytest.raises(openai.ConflictError):  # the conversation is busy meanwhile
            client.conversations.items.create(conv.id, items=[{"role": "user", "content": "?"}])
    for _ in range(200):  # the abort is asynchronous
        try:
            client.conversations.items.create(conv.id, items=[{"role": "user", "content": "!"}])
            break
        except openai.ConflictError:
            time.sleep(0.02)
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert [item.content[0].text for item in items] == ["Tell a long story.", "!"]
    sid = scoped_session(tenant_name(KEY), conv.id)
    assert [t.status for t in server.store.turns(sid, include_incomplete=True)] == ["aborted"]
    # The pending items go into the next response, once.
    reply = client.responses.create(conversation=conv.id, input="Short, please.", **GREEDY)
    inputs = client.responses.input_items.list(reply.id, order="asc").data
    assert [item.content[0].text for item in inputs] == [
        "Tell a long story.",
        "!",
        "Short, please.",
    ]


def test_store_false_continuation_matches_the_stored_one(client):
    first = client.responses.create(input="Name a colour.", **GREEDY)
    request = {"input": "And another one?", "previous_response_id": first.id, **GREEDY}
    unstored = client.responses.create(store=False, **request)
    stored = client.responses.create(**request)
    assert unstored.output_text == stored.output_text
    assert unstored.usage.input_tokens == stored.usage.input_tokens
    assert _cached(unstored) > 0
    # The unstored continuation left the chain untouched: the stored one was its next turn.
    assert _session(stored) == _session(first)


def test_fork_from_an_older_response_reuses_its_prefix(client):
    root = client.responses.create(input="Let us plan a trip to the mountains.", **GREEDY)
    child = client.responses.create(
        input="What should I pack?", previous_response_id=root.id, **GREEDY
    )
    assert _session(child) == _session(root)
    fork = client.responses.create(
        input="What about the beach instead?", previous_response_id=root.id, **GREEDY
    )
    assert _session(fork) != _session(root)
    assert _cached(fork) >= (_history(root) - 1) // 16 * 16 > 0
    assert fork.usage.input_tokens < _history(child) + 20
    # Both branches continue; the original chain still extends in place.
    grandchild = client.responses.create(
        input="And shoes?", previous_response_id=child.id, **GREEDY
    )
    assert _session(grandchild) == _session(root)
    assert _cached(grandchild) >= (_history(child) - 1) // 16 * 16
    on_fork = client.responses.create(input="Sunscreen?", previous_response_id=fork.id, **GREEDY)
    assert _session(on_fork) == _session(fork)
    # The fork's history holds the root's turn exactly, so a greedy re-run agrees.
    again = client.responses.create(
        input="What about the beach instead?", previous_response_id=root.id, **GREEDY
    )
    assert again.output_text == fork.output_text


def test_a_second_turn_on_a_busy_chain_is_a_conflict(server, client):
    head = client.responses.create(input="Start.", **GREEDY)
    sid = scoped_session(tenant_name(KEY), _session(head))
    store = server.store
    index = store.begin_turn(sid, "someone-else", [1, 2, 3], [])  # a turn in flight
    try:
        with pytest.raises(openai.ConflictError):
            client.responses.create(input="Next.", previous_response_id=head.id, **GREEDY)
    finally:
        store.abort_turn(sid, index)
    assert client.responses.create(input="Next.", previous_response_id=head.id, **GREEDY).id


def test_concurrent_continuations_of_one_response_never_share_a_session(client):
    head = client.responses.create(input="Count with me.", **GREEDY)
    results: list[object] = []

    def go(i: int) -> None:
        try:
            results.append(
                client.responses.create(
                    input=f"Branch {i}.", previous_response_id=head.id, **GREEDY
                )
            )
        except openai.ConflictError as exc:
            results.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if not isinstance(r, Exception)]
    assert done and all(isinstance(r, openai.ConflictError) for r in results if r not in done)
    assert len({_session(r) for r in done}) == len(done)  # one in place, the others forks


def test_conversations_items_and_responses(server, client):
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "Hi, I am Ann."}],
        metadata={"topic": "intro"},
    )
    assert conv.object == "conversation" and conv.metadata == {"topic": "intro"}
    added = client.conversations.items.create(
        conv.id, items=[{"type": "message", "role": "user", "content": "What is my name?"}]
    )
    assert added.data[0].content[0].text == "What is my name?"
    first = client.responses.create(conversation=conv.id, input="Answer briefly.", **GREEDY)
    assert first.conversation.id == conv.id
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert [item.role for item in items] == ["user", "user", "user", "assistant"]
    assert items[0].content[0].text == "Hi, I am Ann."
    assert items[-1].content[0].text == first.output_text
    assert items[-1].id == first.output[0].id
    inputs = client.responses.input_items.list(first.id, order="asc")
    assert [item.content[0].text for item in inputs.data] == [
        "Hi, I am Ann.",
        "What is my name?",
        "Answer briefly.",
    ]

    second = client.responses.create(conversation={"id": conv.id}, input="Thanks!", **GREEDY)
    assert _cached(second) >= (_history(first) - 1) // 16 * 16 > 0
    assert _session(second) == _session(first) == conv.id
    newest = client.conversations.items.list(conv.id, limit=2)  # newest first by default
    assert [item.role for item in newest.data] == ["assistant", "user"]
    assert newest.has_more is True
    assert (
        client.conversations.items.retrieve(items[1].id, conversation_id=conv.id).id == items[1].id
    )

    # Used items are history (and KV): deleting one is refused; a pending one can go.
    with pytest.raises(openai.ConflictError):
        client.conversations.items.delete(items[0].id, conversation_id=conv.id)
    pending = client.conversations.items.create(
        conv.id, items=[{"role": "user", "content": "Never mind."}]
    ).data[0]
    assert client.conversations.items.delete(pending.id, conversation_id=conv.id).id == conv.id
    assert len(list(client.conversations.items.list(conv.id))) == 6

    updated = client.conversations.update(conv.id, metadata={"topic": "names"})
    assert client.conversations.retrieve(conv.id).metadata == updated.metadata == {"topic": "names"}
    # Another tenant sees none of it.
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=OTHER_KEY, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.conversations.retrieve(conv.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(second.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(input="x", previous_response_id=second.id, **GREEDY)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(input="x", conversation=conv.id, **GREEDY)

    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    # Its responses stay, and continuing one forks from the kept history.
    assert client.responses.retrieve(second.id).output_text == second.output_text
    after = client.responses.create(input="Still there?", previous_response_id=second.id, **GREEDY)
    assert _session(after) != conv.id and _cached(after) > 0


def test_restart_keeps_responses_and_their_kv_on_disk(tiny_chat_source, tmp_path):
    paths = {
        "store": str(tmp_path / "s.sqlite"),
        "host_num_blocks": 64,
        "disk_num_blocks": 512,
        "kv_disk_path": str(tmp_path / "kv"),
    }
    with (
        running_server(tiny_chat_source, **paths) as server,
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        first = client.responses.create(input="Remember the number 42, please.", **GREEDY)
        second = client.responses.create(
            input="And the colour blue.", previous_response_id=first.id, **GREEDY
        )
        conv = client.conversations.create(items=[{"role": "user", "content": "Hello."}])
        in_conv = client.responses.create(conversation=conv.id, input="Hi!", **GREEDY)
    assert "response_store" not in server.state.extras  # closed at shutdown

    with (
        running_server(tiny_chat_source, **paths) as server,
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        assert client.responses.retrieve(second.id).output_text == second.output_text
        third = client.responses.create(
            input="What did I ask you to remember?", previous_response_id=second.id, **GREEDY
        )
        assert _session(third) == _session(second)
        assert _cached(third) >= (_history(second) - 1) // 16 * 16 > 0
        by_tier = third.usage.input_tokens_details.model_extra["cached_tokens_by_tier"]
        assert by_tier.get("disk", 0) > 0, by_tier
        assert by_tier.get("device", 0) + by_tier.get("host", 0) < _cached(third)
        again = client.responses.create(conversation=conv.id, input="Again.", **GREEDY)
        assert _cached(again) >= (_history(in_conv) - 1) // 16 * 16 > 0
        items = list(client.conversations.items.list(conv.id, order="asc"))
        assert [item.role for item in items] == ["user", "user", "assistant", "user", "assistant"]
