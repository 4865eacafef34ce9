"""Structured output enforced where tokens are sampled: schema checks (400 with what to fix),
the sampler's bitmask, the per-request matchers of a batch, 100 seeded samples that all
validate, and ``response_format`` / ``text.format`` through the SDK."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import openai
import pytest
import torch
from tests.server_harness import running_server

from cadenza import LLM, SamplingParams
from cadenza.runner.sampler import SamplingBatch, sample
from cadenza.structured.spec import StructuredOutput

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def test_invalid_schemas_say_what_to_fix():
    with pytest.raises(ValueError, match="Invalid type: strin"):
        StructuredOutput.json_schema({"properties": {"a": {"type": "strin"}}}).check()
    with pytest.raises(ValueError, match="does not exist"):
        StructuredOutput.json_schema({"$ref": "#/defs/nope"}).check()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput("json_schema", "{").check()
    StructuredOutput.json_schema(SCHEMA).check()
    StructuredOutput("json_object").check()
    with pytest.raises(ValueError):
        SamplingParams(structured_output="json")  # type: ignore[arg-type]
    # The offline API refuses a grammar that cannot compile (it would end the request at once).
    with pytest.raises(ValueError, match="structured_output is not usable: Invalid type"):
        SamplingParams(structured_output=StructuredOutput.json_schema({"type": "objekt"}))
    with pytest.raises(ValueError, match="structured_output is not usable"):
        SamplingParams(structured_output=StructuredOutput.lark("start: undefined_rule"))


def test_sampler_bitmask_restricts_only_the_masked_rows():
    logits = torch.randn(3, 70)
    bitmask = np.zeros((2, 3), dtype=np.int32)
    bitmask[0, 1] = 1 << 5  # row 0: token 37 only
    bitmask[1, 2] = 1 << 1  # row 2: token 65 only
    params = [SamplingParams(temperature=t, seed=1) for t in (0.0, 0.0, 1.0)]
    batch = SamplingBatch(params, [[], [], []], [[1], [1], [1]], (0,), [0, 2], bitmask)
    out = sample(logits, batch)
    assert out.token_ids.tolist() == [37, int(logits[1].argmax()), 65]


def test_hundred_seeded_samples_all_validate(tiny_chat_source):
    """Random weights: the grammar alone makes every sample valid, in one batch of 100."""
    llm = LLM("tiny-chat", source=tiny_chat_source, kv_cost_model="linear", num_threads=1)
    prompt = llm.get_tokenizer().encode_chat([{"role": "user", "content": "A person as JSON"}])
    spec = StructuredOutput.json_schema(SCHEMA)
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=120, structured_output=spec)
        for seed in range(100)
    ]
    outputs = llm.generate([prompt] * 100, params)
    texts = [o.outputs[0].text for o in outputs]
    for output, text in zip(outputs, texts, strict=True):
        assert output.outputs[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 50  # sampled, not one forced string
    again = llm.generate([prompt] * 3, params[:3])
    assert [o.outputs[0].text for o in again] == texts[:3]  # seeded: reproducible
    llm.generate([prompt], SamplingParams(max_tokens=1))  # the next step lets finished go
    assert len(llm.engine.runner.grammar_matchers()) == 0
    llm.close()


@pytest.fixture(scope="module")
def client(tiny_chat_source):
    with (
        running_server(tiny_chat_source, num_blocks=256) as server,
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as c,
    ):
        yield c


def test_chat_response_format_json_schema_and_json_object(client):
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "A person"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
            },
            max_tokens=120,
            seed=seed,
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Anything"}],
        response_format={"type": "json_object"},
        max_tokens=200,
        seed=0,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")


def test_responses_text_format_json_schema_streaming(client):
    with client.responses.stream(
        model="tiny-chat",
        input="A person",
        text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA}},
        max_output_tokens=120,
    ) as events:
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events.get_final_response()
    jsonschema.validate(json.loads(final.output_text), SCHEMA)
    assert deltas == final.output_text
    assert final.text.format.type == "json_schema"


def test_invalid_schema_is_a_400_naming_the_field(client):
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError, match="Invalid type: strin") as info:
        client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )
    assert "response_format.json_schema.schema" in str(info.value)
    with pytest.raises(openai.BadRequestError, match="text.format.schema"):
        client.responses.create(
            model="tiny-chat",
            input="x",
            text={"format": {"type": "json_schema", "name": "x", "schema": bad}},
        )
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )


def test_a_tool_with_an_unusable_parameters_schema_is_a_400_naming_it(client):
    """A forced call is generated under the tool's schema, so a schema that cannot compile
    is refused up front (not a 200 with an empty reply), on both APIs, with or without a
    forced call."""
    bad = {"type": "objekt"}
    tools = [
        {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "f", "parameters": bad}},
    ]
    for choice in ("required", "auto"):
        with pytest.raises(openai.BadRequestError, match="Invalid type: objekt") as info:
            client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": "x"}],
                tools=tools,
                tool_choice=choice,
            )
        assert "tools[1].parameters" in str(info.value)
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\].parameters"):
        client.responses.create(
            model="tiny-chat",
            input="x",
            tools=[{"type": "function", "name": "f", "parameters": bad}],
            tool_choice="required",
        )
