"""The unmodified ``openai`` SDK runs 5-step function-calling loops against the server (chat
completions and Responses, streaming and not): calls parse, results go back, and each step's
cached tokens cover the previous history. The loops run on a tiny random model speaking through
SmolLM2's tokenizer and template (the grammar forces the calls, so the weights do not matter);
one loop runs on the real SmolLM2."""

from __future__ import annotations

import json

import openai
import pytest
from tests.server_harness import running_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BLOCK = 16
PARAMS = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "add", "description": "Add two integers", "parameters": PARAMS},
    },
    {
        "type": "function",
        "function": {"name": "mul", "description": "Multiply two integers", "parameters": PARAMS},
    },
]
RESPONSE_TOOLS = [{"type": "function", **t["function"]} for t in CHAT_TOOLS]
QUESTION = "What is 12 plus 7, times 3? Use the tools."


def _result(name: str, arguments: str) -> str:
    args = json.loads(arguments)
    assert set(args) == {"a", "b"} and all(0 <= v <= 99 for v in args.values())
    return str(args["a"] + args["b"] if name == "add" else args["a"] * args["b"])


@pytest.fixture(scope="module")
def client(tiny_chat_source):
    with (
        running_server(tiny_chat_source, num_blocks=256) as server,
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as c,
    ):
        yield c


def _chat_step(client, messages, stream: bool, choice) -> tuple[list, object, int]:
    kwargs = dict(
        model="tiny-chat",
        messages=messages,
        tools=CHAT_TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0.8,
        seed=len(messages),
    )
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        choice0 = reply.choices[0]
        assert choice0.finish_reason == "tool_calls"
        return choice0.message.tool_calls, reply.usage, reply.usage.completion_tokens
    calls: dict[int, dict] = {}
    usage = reason = None
    for chunk in client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice0 in chunk.choices:
            reason = choice0.finish_reason or reason
            for delta in choice0.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert reason == "tool_calls" and usage is not None
    made = [
        openai.types.chat.ChatCompletionMessageFunctionToolCall(
            id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]}
        )
        for _, c in sorted(calls.items())
    ]
    return made, usage, usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_five_step_tool_loop(client, stream):
    messages: list = [{"role": "user", "content": QUESTION}]
    history = 0
    for step in range(5):
        choice = "required" if step % 2 else {"type": "function", "function": {"name": "mul"}}
        calls, usage, generated = _chat_step(client, messages, stream, choice)
        assert len(calls) == 1
        if step % 2 == 0:
            assert calls[0].function.name == "mul"
        if step:
            assert usage.prompt_tokens_details.cached_tokens >= history - BLOCK
        history = usage.prompt_tokens + generated
        messages.append(
            {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}
        )
        for call in calls:
            result = _result(call.function.name, call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


def _response_step(client, previous, items, stream: bool, choice):
    kwargs = dict(
        model="tiny-chat",
        input=items,
        tools=RESPONSE_TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        max_output_tokens=64,
        temperature=0.8,
        previous_response_id=previous,
    )
    if not stream:
        return client.responses.create(**kwargs)
    kinds = []
    with client.responses.stream(**kwargs) as events:
        for event in events:
            kinds.append(event.type)
        final = events.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert kinds[-1] == "response.completed"
    return final


@pytest.mark.parametrize("stream", [False, True])
def test_responses_five_step_tool_loop(client, stream):
    previous, items, history = None, QUESTION, 0
    for step in range(5):
        choice = "required" if step % 2 else {"type": "function", "name": "add"}
        response = _response_step(client, previous, items, stream, choice)
        calls = [item for item in response.output if item.type == "function_call"]
        assert len(calls) == 1 and response.status == "completed"
        if step % 2 == 0:
            assert calls[0].name == "add"
        usage = response.usage
        if step:
            # A session turn reuses everything but the last sampled token (never computed).
            assert usage.input_tokens_details.cached_tokens >= history - 1
        history = usage.input_tokens + usage.output_tokens
        previous = response.id
        items = [
            {
                "type": "function_call_output",
                "call_id": c.call_id,
                "output": _result(c.name, c.arguments),
            }
            for c in calls
        ]


@pytest.mark.slow
def test_real_smollm2_chat_tool_loop(smollm2_source):
    """SmolLM2 (whose template knows no tools: they go into the system prompt) calls the
    named function with sensible arguments, and takes the result on the next turn."""
    with running_server(smollm2_source, model="smollm2-135m", num_blocks=256) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        messages: list = [{"role": "user", "content": "What is 12 plus 7? Use the add tool."}]
        history = 0
        for step in range(2):
            reply = client.chat.completions.create(
                model="smollm2-135m",
                messages=messages,
                tools=CHAT_TOOLS,
                tool_choice="required",
                parallel_tool_calls=False,
                temperature=0,
                max_tokens=48,
            )
            message = reply.choices[0].message
            assert reply.choices[0].finish_reason == "tool_calls"
            call = message.tool_calls[0]
            assert json.loads(call.function.arguments) == {"a": 12, "b": 7}
            if step:
                assert reply.usage.prompt_tokens_details.cached_tokens >= history - BLOCK
            history = reply.usage.prompt_tokens + reply.usage.completion_tokens
            messages.append(message.model_dump(exclude_none=True))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "19"})
