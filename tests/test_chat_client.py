"""`cadenza chat` against a real server (tiny model, real HTTP): streaming and cache report."""

from __future__ import annotations

import io
import re

import pytest
from tests.server_harness import free_port, running_server

from cadenza.cli import main


@pytest.fixture(scope="module")
def server(tiny_chat_source):
    with running_server(tiny_chat_source) as running:
        yield running


def chat(monkeypatch, capsys, *argv: str, stdin: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["chat", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_two_turns_stream_and_report_cached_tokens(server, monkeypatch, capsys):
    code, out, err = chat(
        monkeypatch,
        capsys,
        "--url",
        server.base_url,
        "--max-tokens",
        "8",
        "--session",
        "chat-test-1",
        "--system",
        "Be brief.",
        stdin="Hello there!\nAnd what about tomorrow?\n",
    )
    assert code == 0, err
    assert "chat-test-1" in out
    assert out.count("assistant> ") == 2
    reports = re.findall(r"\[ttft (\d+) ms, (\d+)/(\d+) prompt tokens cached\]", out)
    assert len(reports) == 2, out
    (_, cached1, prompt1), (_, cached2, prompt2) = reports
    assert int(prompt2) > int(prompt1) > 0
    # Turn 2 sent only the new message; the session's history came from the KV cache.
    assert int(cached2) > 0
    # The reply text streamed between the prompts: something was printed after "assistant> ".
    replies = re.findall(r"assistant> (.*?)\n  \[ttft", out, flags=re.S)
    assert len(replies) == 2 and any(r.strip() for r in replies)
    # The session is on the server with both turns.
    record = server.store.messages("chat-test-1")
    assert [m["role"] for m in record] == ["system", "user", "assistant", "user", "assistant"]


def test_unreachable_server_is_a_clear_error(monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = chat(monkeypatch, capsys, "--url", url, stdin="hi\n")
    assert code == 1
    assert "cannot reach the server" in err and url in err
