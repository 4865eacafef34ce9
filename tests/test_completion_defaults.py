"""``/v1/completions`` without ``max_tokens`` (absent or null) generates OpenAI's default of 16
tokens, never without limit; chat completions keep no default limit."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tests.server_harness import MODEL, running_server

from cadenza.server.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("extra", [{}, {"max_tokens": None}])
def test_completion_max_tokens_defaults_to_16(extra: dict[str, Any]):
    body = CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", **extra})
    assert body.to_sampling_params().max_tokens == 16


def test_completion_max_tokens_given_is_kept():
    body = CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert body.to_sampling_params().max_tokens == 3


def test_chat_keeps_no_default_limit():
    body = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": None}
    )
    assert body.to_sampling_params().max_tokens is None


def test_null_max_tokens_over_http_generates_16(tiny_chat_source):
    with running_server(tiny_chat_source) as server:
        reply = httpx.post(
            server.base_url + "/v1/completions",
            json={"model": MODEL, "prompt": "Once", "max_tokens": None, "ignore_eos": True},
            timeout=120,
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 16
    assert reply.json()["choices"][0]["finish_reason"] == "length"
