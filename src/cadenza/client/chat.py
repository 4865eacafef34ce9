"""`cadenza chat`: a terminal chat client of a running server.

Every turn goes to ``POST /v1/chat/completions`` with an ``X-Session-Id`` header, so only the new
message is sent: the server keeps the conversation (and its KV). Replies stream token by token
(server-sent events); after each one the client prints the time to first token and how many of
the prompt tokens the server found cached (``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from cadenza.client.sse import DONE, delta_text, error_message, parse_sse_line

DEFAULT_URL = "http://127.0.0.1:8000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's own flags (``--session``, ``--system`` and sampling flags are shared)."""
    client = parser.add_argument_group("server client (without --offline)")
    client.add_argument("--url", default=DEFAULT_URL, help="the server (default: %(default)s)")
    client.add_argument(
        "--api-key", default=None, help="Bearer key of the server (default: $CADENZA_API_KEY)"
    )


class ChatError(RuntimeError):
    """A failure the user should see as one line (server unreachable, HTTP error)."""


@dataclass
class TurnResult:
    text: str
    ttft_s: float
    prompt_tokens: int | None
    cached_tokens: int | None
    finish_reason: str | None


class ChatClient:
    """One conversation with a server, kept there under ``session_id``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        session_id: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.base_url = url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.session_id = session_id or f"chat-{uuid.uuid4().hex[:12]}"
        headers = {"X-Session-Id": self.session_id}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
        )
        self.model: str | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, exc: Exception) -> ChatError:
        return ChatError(
            f"cannot reach the server at {self.base_url} ({type(exc).__name__}: {exc}). "
            "Start one with `cadenza serve`, pass --url, or chat with --offline."
        )

    def connect(self) -> str:
        """Check the server answers and pick its model; returns the model name."""
        try:
            resp = self.http.get("/v1/models")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code != 200:
            raise ChatError(
                f"{self.base_url}/v1/models answered HTTP {resp.status_code}: "
                f"{error_message(resp.content)}"
            )
        data = resp.json().get("data") or []
        if not data:
            raise ChatError(f"{self.base_url} serves no model")
        self.model = str(data[0]["id"])
        return self.model

    def session_exists(self) -> bool:
        try:
            return self.http.get(f"/v1/sessions/{self.session_id}").status_code == 200
        except httpx.TransportError:
            return False

    def send(
        self,
        messages: list[dict[str, str]],
        sampling: dict[str, Any],
        on_text: Any = None,
    ) -> TurnResult:
        """Send the new ``messages`` as the session's next turn; stream the reply to
        ``on_text(str)`` as it arrives."""
        if self.model is None:
            self.connect()
        body = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **{k: v for k, v in sampling.items() if v is not None},
        }
        start = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish: str | None = None
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise ChatError(f"HTTP {resp.status_code}: {error_message(resp.content)}")
                for line in resp.iter_lines():
                    event = parse_sse_line(line)
                    if event is None:
                        continue
                    if event == DONE:
                        break
                    assert isinstance(event, dict)
                    if "error" in event:
                        raise ChatError(f"server error: {error_message(str(event))}")
                    text = delta_text(event)
                    if text:
                        if first is None:
                            first = time.monotonic()
                        parts.append(text)
                        if on_text is not None:
                            on_text(text)
                    for choice in event.get("choices") or ():
                        finish = choice.get("finish_reason") or finish
                    if event.get("usage"):
                        usage = event["usage"]
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        details = usage.get("prompt_tokens_details") or {}
        return TurnResult(
            text="".join(parts),
            ttft_s=(first - start) if first is not None else float("nan"),
            prompt_tokens=usage.get("prompt_tokens"),
            cached_tokens=details.get("cached_tokens"),
            finish_reason=finish,
        )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k or None,
        "seed": args.seed,
    }


def _report(result: TurnResult) -> str:
    ttft = f"{result.ttft_s * 1000:.0f} ms" if result.ttft_s == result.ttft_s else "— ms"
    cached = "?" if result.cached_tokens is None else str(result.cached_tokens)
    prompt = "?" if result.prompt_tokens is None else str(result.prompt_tokens)
    return f"  [ttft {ttft}, {cached}/{prompt} prompt tokens cached]"


def _read_line(inp: TextIO, out: TextIO, *, interactive: bool) -> str | None:
    """The next line typed, ``None`` at end of input (``input()`` on a terminal: line editing)."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    print("you> ", end="", file=out, flush=True)
    line = inp.readline()
    return line if line else None


def run_chat(
    args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """The interactive loop. An empty line or end of input quits; the session stays on the
    server, so ``--session ID`` continues it later."""
    import os

    out = stdout or sys.stdout
    inp = stdin or sys.stdin
    api_key = args.api_key or os.environ.get("CADENZA_API_KEY")
    with ChatClient(args.url, session_id=args.session, api_key=api_key) as client:
        try:
            model = client.connect()
        except ChatError as exc:
            print(f"cadenza chat: {exc}", file=sys.stderr)
            return 1
        resumed = args.session is not None and client.session_exists()
        pending: list[dict[str, str]] = []
        if args.system and not resumed:
            pending.append({"role": "system", "content": args.system})
        state = "continuing" if resumed else "new"
        print(
            f"cadenza chat ({model} at {client.base_url}, {state} session {client.session_id})."
            " Empty line or Ctrl-D quits.",
            file=out,
            flush=True,
        )
        sampling = _sampling(args)
        while True:
            line = _read_line(inp, out, interactive=stdin is None and stdout is None)
            if line is None:
                print(file=out)
                return 0
            user = line.strip()
            if not user:
                return 0
            pending.append({"role": "user", "content": user})
            print("assistant> ", end="", file=out, flush=True)
            try:
                result = client.send(
                    pending, sampling, on_text=lambda t: print(t, end="", file=out, flush=True)
                )
            except ChatError as exc:
                print(file=out)
                print(f"cadenza chat: {exc}", file=sys.stderr)
                if "cannot reach" in str(exc):
                    return 1
                # The server rejected the turn; keep a system prompt it has not seen yet.
                pending = [m for m in pending if m["role"] == "system"]
                continue
            pending = []
            print(file=out)
            print(_report(result), file=out, flush=True)
