"""``cadenza serve`` start-up: a port in use fails at once (before the model loads) with a
message naming the port; "serving on" is printed only once the port accepts connections; and
SIGTERM still ends the process with status 0."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from tests.server_harness import free_port
from tests.test_server_limits import _write_hf_dir

from cadenza.model.source import ModelSource

START_TIMEOUT_S = 120


def serve_command(model: str, port: int, data: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cadenza.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--data-dir",
        str(data),
        "--device",
        "cpu",
        "--num-threads",
        "1",
        "--kv-cache-memory-gib",
        "0.05",
        "--kv-host-gib",
        "0.01",
        "--kv-disk-gib",
        "0.05",
        "--log-level",
        "warning",
    ]


def test_port_in_use_fails_before_loading_the_model(tmp_path: Path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # The model does not exist: had it been loaded first, that would be the error.
        done = subprocess.run(
            serve_command("/nonexistent/model.gguf", port, tmp_path / "data"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0
    assert str(port) in done.stderr, done.stderr
    assert "in use" in done.stderr.lower(), done.stderr
    assert "serving" not in done.stdout


def _lines(stream, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_serving_on_is_printed_once_the_port_accepts(tiny_chat_source: ModelSource, tmp_path: Path):
    model = _write_hf_dir(tiny_chat_source, tmp_path / "tiny-chat-hf")
    port = free_port()
    process = subprocess.Popen(
        serve_command(str(model), port, tmp_path / "data"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(output)
            output.append(line)
            if "serving" in line:
                break
        # At once, with no retry: the port accepts when the line is out.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert f"http://127.0.0.1:{port}/v1" in line
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert code == 0, "".join(output)
