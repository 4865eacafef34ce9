"""Text that is not valid Unicode (a lone UTF-16 surrogate such as JSON ``"\\ud800"``) is
refused with a 400 naming where it is, before anything is stored or queued; valid surrogate
pairs (emoji) still work."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tests.server_harness import MODEL, RunningServer, running_server

from cadenza.server.text_checks import find_invalid_text

LONE = "a\\ud800b"  # as it appears in the JSON text: a high surrogate without its pair
EMOJI = "smile \\ud83d\\ude00"  # a valid pair: U+1F600


@pytest.fixture(scope="module")
def server(tiny_chat_source):
    with running_server(tiny_chat_source) as running:
        yield running


@pytest.fixture()
def http(server: RunningServer):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def post_raw(http: httpx.Client, path: str, json_text: str) -> httpx.Response:
    """POST JSON text as is (json= would refuse to encode a lone surrogate)."""
    return http.post(path, content=json_text, headers={"Content-Type": "application/json"})


def assert_invalid_text(reply: httpx.Response, param: str) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]
    assert "Unicode" in error["message"]


def test_find_invalid_text_names_the_path():
    assert find_invalid_text({"a": ["ok", {"b": "x\ud800"}]}) == "a[1].b"
    assert find_invalid_text(["\udfff"]) == "[0]"
    assert find_invalid_text({"k\ud800": 1}) == "k\\ud800"
    assert find_invalid_text({"a": "smile \U0001f600", "n": [1, 2.5, None, True]}) is None


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            f'{{"model": "{MODEL}", "max_tokens": 2, '
            f'"messages": [{{"role": "user", "content": "{LONE}"}}]}}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "{MODEL}", "max_tokens": 2, "messages": [{{"role": "user", '
            f'"content": [{{"type": "text", "text": "{LONE}"}}]}}]}}',
            "messages[0].content[0].text",
        ),
        (
            "/v1/completions",
            f'{{"model": "{MODEL}", "max_tokens": 2, "prompt": "{LONE}"}}',
            "prompt",
        ),
        (
            "/v1/responses",
            f'{{"model": "{MODEL}", "max_output_tokens": 2, "input": "{LONE}"}}',
            "input",
        ),
        (
            "/v1/responses",
            f'{{"model": "{MODEL}", "max_output_tokens": 2, "input": "hi", '
            f'"instructions": "{LONE}"}}',
            "instructions",
        ),
        (
            "/v1/responses",
            f'{{"model": "{MODEL}", "max_output_tokens": 2, '
            f'"input": [{{"role": "user", "content": "{LONE}"}}]}}',
            "input[0].content",
        ),
        (
            "/v1/conversations",
            f'{{"items": [{{"type": "message", "role": "user", "content": "{LONE}"}}]}}',
            "items[0].content",
        ),
    ],
    ids=[
        "chat-content",
        "chat-content-part",
        "completions-prompt",
        "responses-input",
        "responses-instructions",
        "responses-input-message",
        "conversations-items",
    ],
)
def test_lone_surrogate_is_a_400_naming_where(
    http: httpx.Client, server: RunningServer, path: str, body: str, param: str
):
    before = server.state.engine.num_streams
    assert_invalid_text(post_raw(http, path, body), param)
    assert server.state.engine.num_streams == before
    # The server keeps serving.
    assert http.get("/health").status_code == 200


def test_conversation_items_with_a_lone_surrogate_are_not_stored(http: httpx.Client):
    created = http.post(
        "/v1/conversations",
        json={"items": [{"type": "message", "role": "user", "content": "first"}]},
    )
    assert created.status_code == 200, created.text
    conversation = created.json()["id"]
    items_path = f"/v1/conversations/{conversation}/items"
    bad = f'{{"items": [{{"type": "message", "role": "user", "content": "{LONE}"}}]}}'
    assert_invalid_text(post_raw(http, items_path, bad), "items[0].content")
    listed = http.get(items_path)
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["data"]) == 1
    # Nothing was created for a refused conversation either: a lone surrogate in metadata.
    bad_meta = f'{{"metadata": {{"note": "{LONE}"}}}}'
    assert_invalid_text(post_raw(http, "/v1/conversations", bad_meta), "metadata.note")


def test_valid_surrogate_pairs_still_work(http: httpx.Client):
    chat = post_raw(
        http,
        "/v1/chat/completions",
        f'{{"model": "{MODEL}", "max_tokens": 2, '
        f'"messages": [{{"role": "user", "content": "{EMOJI}"}}]}}',
    )
    assert chat.status_code == 200, chat.text
    completion = post_raw(
        http,
        "/v1/completions",
        f'{{"model": "{MODEL}", "max_tokens": 2, "prompt": "{EMOJI}"}}',
    )
    assert completion.status_code == 200, completion.text
    created = post_raw(
        http,
        "/v1/conversations",
        f'{{"items": [{{"type": "message", "role": "user", "content": "{EMOJI}"}}]}}',
    )
    assert created.status_code == 200, created.text
    listed = http.get(f"/v1/conversations/{created.json()['id']}/items")
    assert listed.status_code == 200, listed.text
    data: list[dict[str, Any]] = listed.json()["data"]
    assert "\U0001f600" in str(data[0]["content"])
