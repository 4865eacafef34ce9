"""The `cadenza` command line on the embedded model: one-shot generation and offline chat."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cadenza.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module", autouse=True)
def needs_embedded_model(smollm2_source):
    return smollm2_source


def test_generate_prints_the_completion():
    done = run_cli("generate", "--chat", "What is 2 + 2?", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_offline_chat_streams_two_turns_and_reports_cache_hits():
    done = run_cli("chat", "--offline", "--max-tokens", "8", stdin="Hello!\nAnd again?\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant> ") == 2
    # The second turn resends the first: its prompt prefix is served from the prefix cache.
    reports = [line for line in done.stdout.splitlines() if "prompt tokens cached" in line]
    assert len(reports) == 2
    second_cached = int(reports[1].split("ms, ")[1].split("/")[0])
    assert second_cached > 0


def test_bad_model_path_is_a_clear_error():
    done = run_cli("generate", "hi", "--model", "/nonexistent/model.gguf")
    assert done.returncode != 0
    assert "gguf" in done.stderr.lower() or "model" in done.stderr.lower()


def test_a_missing_or_corrupt_model_file_is_named_in_the_error(tmp_path):
    from cadenza.model.source import load_model_source

    missing = tmp_path / "none.gguf"
    with pytest.raises(ValueError, match="no such file or directory"):
        load_model_source(str(missing))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.gguf.*not a usable GGUF file"):
        load_model_source(str(junk))
