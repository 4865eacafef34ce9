"""End to end on the embedded model: the real server on SmolLM2-135M, driven by the unmodified
``openai`` SDK, checked against Hugging Face transformers with the same weights."""

from __future__ import annotations

import openai
import pytest
import torch
from tests.server_harness import running_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL = "smollm2-135m"
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def server(smollm2_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-server")
    with running_server(
        smollm2_source,
        model=MODEL,
        store=str(root / "store.sqlite"),
        num_blocks=192,
        host_num_blocks=256,
        disk_num_blocks=1024,
        kv_disk_path=str(root / "kv"),
    ) as running:
        yield running


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _transformers_greedy(hf_model, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=eos,
        )
    return out[0, len(prompt) :].tolist()


def test_chat_matches_transformers_and_streams_the_same_text(
    client, server, smollm2_source, smollm2_hf
):
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24
    )
    tokenizer = smollm2_source.tokenizer
    prompt = tokenizer.encode_chat(messages)
    assert reply.usage.prompt_tokens == len(prompt)
    reference = _transformers_greedy(smollm2_hf, prompt, 24, tokenizer.eos_token_ids[0])
    if reference and reference[-1] in tokenizer.eos_token_ids:
        reference = reference[:-1]
    assert reply.choices[0].message.content == tokenizer.decode(reference)
    assert "Paris" in reply.choices[0].message.content

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    # The same prompt again: every full block of it comes from the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) // 16 * 16


def test_completions_on_the_real_model(client):
    out = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert "Paris" in out.choices[0].text
    assert out.usage.completion_tokens <= 8


def test_responses_chain_reuses_the_session_kv_exactly(client, server, smollm2_source, smollm2_hf):
    previous = None
    for turn, text in enumerate(
        [
            "My name is Ada and I like sailing.",
            "What is a good first boat?",
            "How do I learn to tie knots?",
            "What did I say I like?",
        ]
    ):
        response = client.responses.create(
            model=MODEL,
            input=text,
            previous_response_id=previous,
            temperature=0,
            max_output_tokens=24,
        )
        cached = response.usage.input_tokens_details.cached_tokens
        if turn:
            assert cached > 0, f"turn {turn} recomputed its history"
            # Only the new message and the template around it are computed.
            assert response.usage.input_tokens - cached < 64
        previous = response.id
    # The last turn, computed over history that came from the KV cache, says exactly what
    # transformers says when it recomputes the whole conversation from the stored token ids.
    history = server.store.history_token_ids(response.model_extra["session_id"])
    prompt = history[: response.usage.input_tokens]
    tokenizer = smollm2_source.tokenizer
    reference = _transformers_greedy(smollm2_hf, prompt, 24, tokenizer.eos_token_ids[0])
    assert response.output_text == tokenizer.decode(reference)


def test_conversation_turns_reuse_the_session_kv(client):
    conv = client.conversations.create(items=[{"role": "user", "content": "Hello!"}])
    first = client.responses.create(
        model=MODEL, conversation=conv.id, input="Name a colour.", max_output_tokens=8
    )
    second = client.responses.create(
        model=MODEL, conversation=conv.id, input="Another one.", max_output_tokens=8
    )
    assert second.usage.input_tokens_details.cached_tokens > 0
    roles = [item.role for item in client.conversations.items.list(conv.id, order="asc")]
    assert roles == ["user", "user", "assistant", "user", "assistant"]
    assert first.id != second.id
    assert second.usage.input_tokens - second.usage.input_tokens_details.cached_tokens < 64
