"""Engine outputs in the OpenAI wire format: completions, chunks, usage and logprobs."""

from __future__ import annotations

import json
import time
from typing import Any

from cadenza.outputs import CompletionOutput, Logprob, RequestOutput
from cadenza.tools.parsers import ParsedOutput, ToolCall


def usage(output: RequestOutput) -> dict[str, Any]:
    prompt = len(output.prompt_token_ids)
    completion = len(output.outputs[0].token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens},
    }


def _token_bytes(text: str | None) -> list[int] | None:
    return list(text.encode("utf-8")) if text is not None else None


def chat_logprobs(completion: CompletionOutput, start: int, top_n: int) -> dict[str, Any] | None:
    """``choices[i].logprobs`` for the tokens from ``start`` on (streaming sends slices)."""
    if completion.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(
        completion.token_ids[start:], completion.logprobs[start:], strict=False
    ):
        chosen = entry.get(token_id) or Logprob(float("-inf"))
        others = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
        top = [
            {
                "token": lp.decoded_token or "",
                "logprob": _finite(lp.logprob),
                "bytes": _token_bytes(lp.decoded_token),
            }
            for _, lp in others
            if lp.rank is not None
        ][:top_n]
        content.append(
            {
                "token": chosen.decoded_token or "",
                "logprob": _finite(chosen.logprob),
                "bytes": _token_bytes(chosen.decoded_token),
                "top_logprobs": top,
            }
        )
    return {"content": content}


def completion_logprobs(completion: CompletionOutput, start: int) -> dict[str, Any] | None:
    """The legacy completions ``logprobs`` object."""
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for token_id, entry in zip(
        completion.token_ids[start:], completion.logprobs[start:], strict=False
    ):
        chosen = entry.get(token_id) or Logprob(float("-inf"))
        piece = chosen.decoded_token or ""
        tokens.append(piece)
        token_logprobs.append(_finite(chosen.logprob))
        top.append(
            {lp.decoded_token or "": _finite(lp.logprob) for lp in entry.values() if lp.rank}
        )
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _finite(x: float) -> float:
    # JSON has no infinities; a token with probability 0 reports the lowest float.
    return x if x == x and abs(x) != float("inf") else -9999.0


def tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call in a message (``index`` None) or in a stream delta."""
    body: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return body if index is None else {"index": index, **body}


def finish_reason(completion: CompletionOutput, made_calls: bool) -> str | None:
    """OpenAI's ``tool_calls`` when a reply that ended on its own made calls."""
    reason = completion.finish_reason
    return "tool_calls" if made_calls and reason == "stop" else reason


def chat_completion(
    request_id: str,
    model: str,
    output: RequestOutput,
    top_n: int,
    session_id: str | None,
    parsed: ParsedOutput | None = None,
) -> dict[str, Any]:
    """A chat completion; ``parsed`` splits the reply into content and tool calls."""
    completion = output.outputs[0]
    message: dict[str, Any] = {"role": "assistant", "content": completion.text}
    if parsed is not None and parsed.calls:
        message["content"] = parsed.content or None
        message["tool_calls"] = [tool_call(c) for c in parsed.calls]
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": chat_logprobs(completion, 0, top_n),
                "finish_reason": finish_reason(completion, bool(parsed and parsed.calls)),
            }
        ],
        "usage": usage(output),
    }
    if session_id is not None:
        body["session_id"] = session_id
    return body


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def text_completion(request_id: str, model: str, output: RequestOutput, text: str) -> dict:
    completion = output.outputs[0]
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": completion_logprobs(completion, 0),
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage(output),
    }


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"
