"""Tool-call formats on fixed strings: parsing, writing back, streaming, the forcing grammar
(every forced output parses), parser choice and request validation."""

from __future__ import annotations

import json

import llguidance
import pytest

from cadenza.tools.parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ToolCall,
    select_parser,
)
from cadenza.tools.spec import ToolChoice, parse_tool_choice, parse_tools
from cadenza.tools.stream import ToolCallStream
from cadenza.tools.template import ToolContext

TOOLS = parse_tools(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12}},
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "name": "now", "parameters": {"type": "object", "properties": {}}},
    ]
)


def test_hermes_parses_content_and_several_calls():
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    )
    parsed = HermesParser().parse(text)
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("now", {}),
    ]
    assert len({c.id for c in parsed.calls}) == 2


def test_hermes_unterminated_last_call_and_garbage():
    parsed = HermesParser().parse('<tool_call>\n{"name": "now", "arguments": {}}')
    assert [c.name for c in parsed.calls] == ["now"]
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert HermesParser().parse(broken).calls == []
    assert HermesParser().parse(broken).content == broken
    assert HermesParser().parse("plain answer").content == "plain answer"


def test_llama3_json_calls_with_python_tag_and_semicolons():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; ' + (
        '{"name": "now", "parameters": {}}'
    )
    parsed = Llama3JsonParser().parse(text)
    assert parsed.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("now", {}),
    ]
    assert Llama3JsonParser().parse("The answer is {x}").calls == []


def test_mistral_calls_with_and_without_marker():
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    assert [c.name for c in MistralParser().parse(text).calls] == ["get_weather"]
    bare = '[{"name": "now", "arguments": {}}]'
    assert [c.name for c in MistralParser().parse(bare).calls] == ["now"]
    assert MistralParser().parse("[1, 2]").calls == []


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser(), MistralParser()])
def test_render_then_parse_round_trips(parser):
    calls = [ToolCall("get_weather", '{"city": "Lima"}'), ToolCall("now", "{}")]
    parsed = parser.parse(parser.render(calls))
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Lima"}),
        ("now", {}),
    ]


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser(), MistralParser()])
def test_forcing_grammar_accepts_the_written_call_and_rejects_others(parser):
    choice = ToolChoice("required", "get_weather")
    grammar = llguidance.LLMatcher.grammar_from_lark(parser.grammar(TOOLS, choice, False))
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    written = parser.render([ToolCall("get_weather", '{"city": "Lima"}')])
    if isinstance(parser, MistralParser):
        written = written.removeprefix("[TOOL_CALLS]")  # a special token, outside the grammar
    assert _matches(grammar, written)
    assert not _matches(grammar, written.replace("get_weather", "now"))


def _matches(grammar: str, text: str) -> bool:
    """Whether ``text`` is a complete match, checked byte by byte on a byte tokenizer."""
    tokenizer = llguidance.LLTokenizer(_byte_tokenizer_json())
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    ok = matcher.consume_tokens(list(text.encode()))
    return ok and not matcher.is_error() and matcher.is_accepting()


def _byte_tokenizer_json() -> str:
    from cadenza.model.tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    vocab = {spell[b]: b for b in range(256)}
    vocab["</s>"] = 256
    return json.dumps(
        {
            "version": "1.0",
            "added_tokens": [
                {
                    "id": 256,
                    "content": "</s>",
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            ],
            "pre_tokenizer": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": False,
            },
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": False,
            },
            "model": {"type": "BPE", "vocab": vocab, "merges": []},
        }
    )


def test_stream_holds_back_marker_prefixes_and_sends_complete_calls():
    stream = ToolCallStream(HermesParser())
    text = (
        'Sure.<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}'
    )
    content, calls = "", []
    for i in range(0, len(text), 3):
        step = stream.feed(text[i : i + 3])
        content += step.content
        assert "<" not in step.content  # never a piece of the marker
        calls += step.calls
    assert content == "Sure."
    assert [c.name for c in calls] == ["now"]  # the second is not closed yet
    rest = stream.finish()
    assert [c.name for c in rest.calls] == ["get_weather"] and rest.content == ""


def test_stream_without_calls_gives_back_all_text():
    stream = ToolCallStream(HermesParser())
    sent = stream.feed("a < b and <tool").content
    rest = stream.finish()
    assert sent + rest.content == "a < b and <tool" and not rest.calls


def test_parser_auto_selection_from_the_template():
    assert select_parser("auto", "{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert select_parser("auto", "<tool_call>{{ tools }}").name == "hermes"
    assert select_parser("auto", "<|start_header_id|>{{ tools }}").name == "llama3_json"
    assert select_parser("auto", None).name == "hermes"
    assert select_parser("mistral", "<tool_call>").name == "mistral"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        select_parser("pythonic", None)


def test_tools_and_tool_choice_validation():
    with pytest.raises(ValueError, match="only function tools"):
        parse_tools([{"type": "web_search"}])
    with pytest.raises(ValueError, match="unique"):
        parse_tools([{"type": "function", "name": "a"}, {"type": "function", "name": "a"}])
    with pytest.raises(ValueError, match="not in tools"):
        parse_tool_choice({"type": "function", "function": {"name": "zzz"}}, TOOLS)
    with pytest.raises(ValueError, match="needs at least one tool"):
        parse_tool_choice("required", [])
    assert parse_tool_choice(None, TOOLS).mode == "auto"
    assert parse_tool_choice({"type": "function", "name": "now"}, TOOLS) == ToolChoice(
        "required", "now"
    )


def test_template_without_tools_gets_the_prompt_once_and_calls_as_text():
    context = ToolContext(TOOLS, ToolChoice("auto"), HermesParser(), native=False)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
    ]
    first = context.prepare(messages, first_turn=True)
    assert (
        first[0]["content"].startswith("Be brief.\n\n# Tools")
        and "get_weather" in first[0]["content"]
    )
    assert first[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
    }
    later = context.prepare(messages[3:], first_turn=False)
    assert later == [{"role": "tool", "content": "12:00"}]
    native = ToolContext(TOOLS, ToolChoice("auto"), HermesParser(), native=True)
    assert native.prepare(messages, True) == messages
    assert [t["function"]["name"] for t in native.template_tools()] == ["get_weather", "now"]
