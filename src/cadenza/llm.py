"""The vLLM-compatible offline API: ``LLM(model=...).generate(...)`` and ``.chat(...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cadenza.config import CacheConfig, EngineConfig, SchedulerConfig
from cadenza.core.sampling_params import SamplingParams
from cadenza.engine import LLMEngine
from cadenza.model.source import ModelSource
from cadenza.model.tokenizer import Tokenizer
from cadenza.outputs import RequestOutput

Prompt = str | Sequence[int] | dict[str, Any]
Messages = list[dict[str, Any]]


class LLM:
    """Loads a model once and runs batches of prompts to completion.

    ``model`` is the alias ``smollm2-135m`` (the embedded default), a ``.gguf`` file or a Hugging
    Face model directory. ``source`` injects an already loaded model (tests use random weights).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        source: ModelSource | None = None,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gib: float = 1.0,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        long_prefill_token_threshold: int = 0,
        scheduling_policy: str = "fcfs",
        attention_backend: str = "auto",
        linear_backend: str = "auto",
        num_threads: int | None = None,
        kv_host_gib: float = 0.0,
        kv_disk_gib: float = 0.0,
        kv_disk_path: str | None = None,
        host_num_blocks: int | None = None,
        disk_num_blocks: int | None = None,
        kv_eviction_policy: str = "cost",
        kv_offload_threshold: float = 0.25,
        kv_pin_cap_fraction: float = 0.20,
        kv_disk_write_through: bool = True,
        kv_cost_model: str = "profile",
        session_store_path: str | None = None,
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            seed=seed,
            num_threads=num_threads,
            max_model_len=max_model_len,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                kv_cache_memory_gib=kv_cache_memory_gib,
                enable_prefix_caching=enable_prefix_caching,
                kv_host_gib=kv_host_gib,
                kv_disk_gib=kv_disk_gib,
                kv_disk_path=kv_disk_path,
                host_num_blocks=host_num_blocks,
                disk_num_blocks=disk_num_blocks,
                kv_eviction_policy=kv_eviction_policy,  # type: ignore[arg-type]
                kv_offload_threshold=kv_offload_threshold,
                kv_pin_cap_fraction=kv_pin_cap_fraction,
                kv_disk_write_through=kv_disk_write_through,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                long_prefill_token_threshold=long_prefill_token_threshold,
                policy=scheduling_policy,  # type: ignore[arg-type]
            ),
            attention_backend=attention_backend,  # type: ignore[arg-type]
            linear_backend=linear_backend,  # type: ignore[arg-type]
            session_store_path=session_store_path,
            kv_cost_model=kv_cost_model,  # type: ignore[arg-type]
        )
        self.engine = LLMEngine(config, source)
        self._counter = 0

    def get_tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        A prompt is a string, a list of token ids, or ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}`` (optionally with ``"cache_salt"``).
        """
        items = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(items))
        if priority is not None and len(priority) != len(items):
            raise ValueError("priority needs one value per prompt")
        ids = []
        try:
            for i, (item, p) in enumerate(zip(items, params, strict=True)):
                prompt, salt = _unpack(item, cache_salt)
                rid = f"llm-{self._counter}"
                self._counter += 1
                prio = priority[i] if priority is not None else 0
                ids.append(self.engine.add_request(rid, prompt, p, priority=prio, cache_salt=salt))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        cache_salt: str | None = None,
        session_id: str | None = None,
        retention: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them.

        With ``session_id``, ``messages`` are only the *new* messages of the session's next
        turn: the engine runs the session's stored exact token history plus the template delta,
        so the previous turns' KV is reused wherever it lives (device, host or disk). The first
        turn of a new session passes its opening messages (system prompt included).
        ``retention={"ttl_s": 30}`` keeps the session's KV pinned on the device after the turn.
        """
        if session_id is not None:
            if not _is_conversation(messages):
                raise ValueError("with session_id, pass one list of new messages")
            params = sampling_params if isinstance(sampling_params, SamplingParams) else None
            if sampling_params is not None and params is None:
                raise ValueError("with session_id, pass one SamplingParams")
            rid = self.engine.add_turn(
                session_id,
                messages,  # type: ignore[arg-type]
                params,
                tenant=cache_salt or "",
                retention=retention,
            )
            return self._run([rid])
        conversations = [messages] if _is_conversation(messages) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = [
            {"prompt_token_ids": tokenizer.encode_chat(c, add_generation_prompt)}  # type: ignore[arg-type]
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, cache_salt=cache_salt)

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def hint(
        self, session_id: str, expected_arrival_s: float | None = None, *, tenant: str = ""
    ) -> dict[str, int]:
        """Tell the engine the session's next turn is coming; its KV moves towards the device."""
        return self.engine.hint(session_id, expected_arrival_s, tenant=tenant)

    def end_session(self, session_id: str, *, delete: bool = False) -> bool:
        return self.engine.end_session(session_id, delete=delete)

    def session_messages(self, session_id: str) -> list[dict[str, Any]]:
        """The session's completed turns as chat messages (from the durable store)."""
        return self.engine.store.messages(session_id)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        while pending:
            for output in self.engine.step():
                if output.finished and output.request_id in pending:
                    final[output.request_id] = output
                    pending.discard(output.request_id)
            if pending and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"requests vanished without finishing: {sorted(pending)}")
        return [final[rid] for rid in request_ids]


def _is_conversation(messages: Any) -> bool:
    return isinstance(messages, list) and (not messages or isinstance(messages[0], dict))


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params


def _unpack(item: Prompt, cache_salt: str | None) -> tuple[str | Sequence[int], str | None]:
    if isinstance(item, dict):
        salt = item.get("cache_salt", cache_salt)
        if "prompt_token_ids" in item:
            return item["prompt_token_ids"], salt
        if "prompt" in item:
            return item["prompt"], salt
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return item, cache_salt
