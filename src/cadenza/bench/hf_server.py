"""The plain Hugging Face transformers server that ``cadenza bench serve`` compares against.

It is what a Python user would write without a serving engine: a FastAPI app whose
``/v1/chat/completions`` renders the chat template, runs ``model.generate`` in a worker thread
and streams the tokens back as server-sent events. Design choices, stated because they decide
the numbers:

* **one request at a time**, behind a lock (a naive server; ``generate`` does not batch requests
  of different lengths arriving at different times); waiting requests queue in arrival order;
* **stateless**: the client resends the whole conversation and every turn prefills all of it
  (no KV kept between requests);
* same weights as Cadenza (the HF Llama built from the GGUF Cadenza loads, float32, SDPA
  attention), same tokenizer and chat template (Cadenza's), ``torch.set_num_threads(--threads)``;
* tokens are streamed one by one (a streamer that hands each new token id to the event loop),
  so time to first token is not delayed by word buffering.

Run: ``python -m cadenza.bench.hf_server --port 8001 --threads 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def build_app(model: Any, tokenizer: Any, model_name: str) -> FastAPI:
    # FastAPI resolves the handlers' annotations (``Request``) from this module's globals.
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    app = FastAPI(title="transformers baseline")
    lock = asyncio.Lock()
    eos_ids = list(model.config.eos_token_id or [])
    if isinstance(model.config.eos_token_id, int):
        eos_ids = [model.config.eos_token_id]

    class TokenStreamer(BaseStreamer):
        """Hands every generated token id to the event loop (the first ``put`` is the prompt)."""

        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    class Cancelled(StoppingCriteria):
        def __init__(self, flag: threading.Event) -> None:
            self.flag = flag

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool)

    def generate(prompt: list[int], body: dict[str, Any], streamer: Any, stop: Any) -> None:
        max_new = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
        temperature = float(body.get("temperature", 1.0) or 0.0)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": temperature > 0,
            "pad_token_id": eos_ids[0] if eos_ids else 0,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([Cancelled(stop)]),
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
            kwargs["top_p"] = float(body.get("top_p", 1.0) or 1.0)
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_new
        ids = torch.tensor([prompt])
        try:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        except Exception:  # the stream must end even if generate fails
            streamer.end()
            raise

    def chunk(rid: str, created: int, delta: dict[str, Any], finish: str | None) -> str:
        event = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(event)}\n\n"

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "busy": lock.locked()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        messages = [
            {"role": m["role"], "content": m.get("content") or ""} for m in body["messages"]
        ]
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        max_new = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)

        async def run() -> AsyncIterator[tuple[list[int], str | None]]:
            """Yields (new token ids, finish reason) as generation proceeds, under the lock."""
            async with lock:
                loop = asyncio.get_running_loop()
                queue: asyncio.Queue = asyncio.Queue()
                stop = threading.Event()
                thread = threading.Thread(
                    target=generate,
                    args=(prompt, body, TokenStreamer(loop, queue), stop),
                    daemon=True,
                )
                thread.start()
                produced = 0
                try:
                    while True:
                        token = await queue.get()
                        if token is None:
                            break
                        produced += 1
                        yield [token], None
                    finish = "length" if produced >= max_new else "stop"
                    yield [], finish
                finally:
                    stop.set()  # client gone or done: let generate() return
                    await asyncio.to_thread(thread.join)

        if not body.get("stream"):
            tokens: list[int] = []
            finish: str | None = None
            async with contextlib.aclosing(run()) as steps:
                async for new, reason in steps:
                    tokens += new
                    finish = reason or finish
            text = tokenizer.decode([t for t in tokens if t not in eos_ids])
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage(len(prompt), len(tokens)),
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            yield chunk(rid, created, {"role": "assistant", "content": ""}, None)
            tokens: list[int] = []
            sent = ""
            async with contextlib.aclosing(run()) as steps:
                async for new, finish in steps:
                    tokens += new
                    if new:
                        text = tokenizer.decode([t for t in tokens if t not in eos_ids])
                        # Hold back an incomplete UTF-8 sequence until its last byte arrives.
                        if not text.endswith("\ufffd") and len(text) > len(sent):
                            yield chunk(rid, created, {"content": text[len(sent) :]}, None)
                            sent = text
                    if finish:
                        yield chunk(rid, created, {}, finish)
            if include_usage:
                event = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model_name,
                    "choices": [],
                    "usage": usage(len(prompt), len(tokens)),
                }
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: --model)"
    )
    args = parser.parse_args(argv)

    import torch
    import uvicorn

    from cadenza.model.hf_reference import build_hf_model
    from cadenza.model.source import load_model_source

    torch.set_num_threads(args.threads)
    source = load_model_source(args.model)
    if source.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer")
    model = build_hf_model(source.config, source.state_dict, attn_implementation="sdpa")
    model.eval()
    name = args.served_model_name or args.model
    app = build_app(model, source.tokenizer, name)
    print(f"hf_server: serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
